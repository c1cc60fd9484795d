"""The pretraining dataset: conventions, masking statistics, negatives, determinism, bad input, a training step."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from components.data.collate import Collator, model_inputs
from components.data.common import DataError, EmptySplitError, MissingFeaturesError
from components.data.pretraining import PretrainingDataConfig, PretrainingDataset, validated_captions
from components.data.regions import RegionSource
from components.data.sampler import ResumableDistributedSampler
from model import ViLBertForPretraining
from tests.components.test_data_world import SPEC, TINY, World, shared_world, write_store


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


_DATASETS: dict[str, PretrainingDataset] = {}


def dataset(world: World, **changes) -> PretrainingDataset:
    key = repr(sorted(changes.items()))
    if key not in _DATASETS:
        config = PretrainingDataConfig(**changes)
        _DATASETS[key] = PretrainingDataset(
            validated_captions(world.validation), world.regions(), world.tokenizer, config
        )
    return _DATASETS[key]


def test_items_follow_the_model_conventions(world: World) -> None:
    ds = dataset(world)
    captions = pq.read_table(validated_captions(world.validation)).to_pylist()
    assert len(ds) == sum(c["split"] == "train" for c in captions) == ds.report.kept and ds.report.reconciled
    item = ds[0]
    t, n = item["input_ids"].shape[0], item["features"].shape[0]
    assert item["input_ids"][0] == ds.tokenizer.cls_token_id and item["input_ids"][-1] == ds.tokenizer.sep_token_id
    assert t <= 36 and item["masked_lm_labels"].shape == (t,) and item["attention_mask"].tolist() == [1] * t
    assert item["boxes"].shape == (n, 5) and torch.equal(item["boxes"][0], torch.tensor([0.0, 0, 1, 1, 1]))
    assert item["region_labels"].shape == (n,) and item["region_targets"].shape == (n, TINY.vision.target_size)
    assert torch.allclose(item["region_targets"].sum(-1), torch.ones(n), atol=1e-2)  # class distributions
    assert item["alignment_labels"].ndim == 0 and item["meta"]["image_id"] == ds.image_id(0)


def test_masking_statistics_match_the_paper(world: World) -> None:
    ds = dataset(world)
    tok = ds.tokenizer
    chosen = masked = random = kept = maskable = 0
    regions = regions_masked = zeroed = 0
    for epoch in range(60):
        for index in range(len(ds)):
            item = ds[(epoch, index)]
            labels, ids = item["masked_lm_labels"], item["input_ids"]
            assert labels[0] == -1 and labels[-1] == -1  # [CLS] / [SEP] never
            where = labels >= 0
            maskable += len(labels) - 2
            chosen += int(where.sum())
            masked += int((ids[where] == tok.mask_token_id).sum())
            kept += int((ids[where] == labels[where]).sum())
            random += int(((ids[where] != tok.mask_token_id) & (ids[where] != labels[where])).sum())
            region_labels = item["region_labels"]
            assert region_labels[0] == -1  # region 0 never
            regions += len(region_labels) - 1
            regions_masked += int((region_labels == 1).sum())
            zeroed += int((item["features"][region_labels == 1].abs().sum(-1) == 0).sum())
    assert chosen > 1500 and regions_masked > 1000  # about 3 standard deviations below are the bounds
    assert abs(chosen / maskable - 0.15) < 0.02 and abs(regions_masked / regions - 0.15) < 0.02
    assert abs(masked / chosen - 0.8) < 0.03
    # a random token may by chance be the original one: "kept" is 10% + 10% / vocabulary size
    assert abs(random / chosen - 0.1) < 0.02 and abs(kept / chosen - 0.1) < 0.02
    assert abs(zeroed / regions_masked - 0.9) < 0.03


def test_padding_is_never_masked_and_labels_line_up_after_collation(world: World) -> None:
    ds = dataset(world)
    batch = Collator(pad_token_id=ds.tokenizer.pad_token_id)([ds[i] for i in range(8)])
    pad_text = batch["attention_mask"] == 0
    pad_regions = batch["region_mask"] == 0
    assert pad_text.any() and pad_regions.any()
    assert (batch["masked_lm_labels"][pad_text] == -1).all() and (batch["region_labels"][pad_regions] == -1).all()
    assert (batch["region_labels"][:, 0] == -1).all()


def test_negatives_are_captions_of_other_images(world: World) -> None:
    ds = dataset(world)
    labels = []
    for epoch in range(10):
        for index in range(len(ds)):
            item = ds[(epoch, index)]
            meta = item["meta"]
            labels.append(int(item["alignment_labels"]))
            if labels[-1] == 1:
                assert meta["caption_image_id"] != meta["image_id"]
            else:
                assert meta["caption_image_id"] == meta["image_id"]
    assert abs(sum(labels) / len(labels) - 0.5) < 0.08


def test_mismatched_pairs_can_go_unsupervised(world: World) -> None:
    """masked_pairs="matched": only matched pairs are supervised.  Every input is masked as with the default (a
    negative without [MASK] tokens would give its alignment label away), only the negatives' labels are gone."""
    default, matched_only = dataset(world), dataset(world, masked_pairs="matched")
    negatives = masked_inputs = 0
    for epoch, index in [(e, i) for e in range(5) for i in range(len(default))]:
        a, b = default[(epoch, index)], matched_only[(epoch, index)]
        assert a["meta"] == b["meta"] and torch.equal(a["alignment_labels"], b["alignment_labels"])
        if int(b["alignment_labels"]) == 1:
            negatives += 1
            assert (b["masked_lm_labels"] == -1).all() and (b["region_labels"] == -1).all()
            masked_inputs += int((b["input_ids"] == default.tokenizer.mask_token_id).any())
        else:
            for key in ("masked_lm_labels", "region_labels"):
                assert torch.equal(a[key], b[key]), key
        for key in ("input_ids", "features"):
            assert torch.equal(a[key], b[key]), key
    assert 0 < negatives < 5 * len(default) and masked_inputs > negatives / 4


def test_items_depend_on_seed_epoch_and_index_only(world: World) -> None:
    ds = dataset(world)
    ds.set_epoch(3)
    a = ds[5]
    b = pickle.loads(pickle.dumps(ds))[(3, 5)]  # another process's copy, the tuple key
    for key in ("input_ids", "masked_lm_labels", "features", "region_labels", "alignment_labels"):
        assert torch.equal(a[key], b[key]), key
    others = [ds[(e, 5)] for e in range(4, 9)]
    assert any(not torch.equal(a["masked_lm_labels"], o["masked_lm_labels"]) for o in others)
    other_seed = dataset(world, seed=1)
    assert any(not torch.equal(ds[(3, i)]["region_labels"], other_seed[(3, i)]["region_labels"]) for i in range(5))


def test_missing_features_are_an_error_or_skipped_with_a_count(world: World, tmp_path) -> None:
    partial = tmp_path / "store"
    write_store(world.root, partial, skip=frozenset({"syn-000002", "syn-000007"}))
    regions = RegionSource(partial, TINY)
    captions = validated_captions(world.validation)
    with pytest.raises(MissingFeaturesError, match=r"2 images without features .*'syn-000002', 'syn-000007'"):
        PretrainingDataset(captions, regions, world.tokenizer)
    ds = PretrainingDataset(captions, regions, world.tokenizer, PretrainingDataConfig(skip_missing_images=True))
    assert ds.report.dropped == {"missing_features": 2} and ds.report.reconciled
    assert "syn-000002" not in {ds.image_id(i) for i in range(len(ds))}


def test_bad_input_is_refused_clearly(world: World, tmp_path) -> None:
    captions = validated_captions(world.validation)
    with pytest.raises(ValueError, match="masked_pairs must be one of \\('all', 'matched'\\), got 'some'"):
        PretrainingDataConfig(masked_pairs="some")
    with pytest.raises(EmptySplitError, match="split 'nope' has no usable rows"):
        PretrainingDataset(captions, world.regions(), world.tokenizer, PretrainingDataConfig(split="nope"))
    uniform = tmp_path / "uniform"
    write_store(world.root, uniform, spec=replace(SPEC, backend="import:tsv+uniform-class-probs"))
    with pytest.raises(DataError, match="placeholder \\(uniform\\) class distributions"):
        PretrainingDataset(captions, RegionSource(uniform, TINY), world.tokenizer)
    allowed = PretrainingDataConfig(allow_uniform_class_probs=True)
    assert len(PretrainingDataset(captions, RegionSource(uniform, TINY), world.tokenizer, allowed)) > 0
    # regression predicts features (the model needs target_size == feature_size; check_model then wants C == D)
    d = TINY.vision.feature_size
    square = tmp_path / "square"
    write_store(world.root, square, spec=replace(SPEC, backend="import:tsv+uniform-class-probs", num_classes=d))
    config = TINY.replace(vision=replace(TINY.vision, target_size=d), region_objective="regression")
    item = PretrainingDataset(captions, RegionSource(square, config), world.tokenizer)[(0, 1)]
    assert torch.equal(item["region_targets"][1:], RegionSource(square, config)[item["meta"]["image_id"]].features[1:])
    small = TINY.replace(text=replace(TINY.text, vocab_size=64))
    with pytest.raises(DataError, match="tokenizer has 128 tokens but the model's text.vocab_size is 64"):
        PretrainingDataset(captions, RegionSource(world.store, small), world.tokenizer)
    with pytest.raises(FileNotFoundError):
        PretrainingDataset(tmp_path / "nothing.parquet", world.regions(), world.tokenizer)


def test_a_training_step_runs_on_loader_batches(world: World) -> None:
    ds = dataset(world)
    sampler = ResumableDistributedSampler(ds, num_replicas=1, rank=0, seed=0)
    loader = DataLoader(
        ds, batch_size=6, sampler=sampler, num_workers=2, collate_fn=Collator(ds.tokenizer.pad_token_id)
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 6 and len(batch["meta"]["caption_id"]) == 6
    torch.manual_seed(0)
    model = ViLBertForPretraining(TINY)
    out = model(**model_inputs(batch))
    assert out.masked_lm_loss is not None and out.masked_region_loss is not None and out.alignment_loss is not None
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.heads.alignment.weight.grad is not None
