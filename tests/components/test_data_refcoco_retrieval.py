"""RefCOCO+ IoU targets (by hand and on the world) and Flickr30k retrieval (4-way items, hard negatives, gallery)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.data.collate import Collator, model_inputs
from components.data.common import EmptySplitError
from components.data.tasks import (
    TASKS,
    RefCOCODataConfig,
    RefCOCODataset,
    RetrievalDataConfig,
    RetrievalGallery,
    RetrievalTrainDataset,
    TaskFiles,
)
from components.data.tasks.refcoco import grounding_hits, grounding_targets, xywh_to_xyxy
from components.data.tasks.retrieval import pair_scores, word_neighbours
from components.metrics.retrieval import retrieval_scores
from model import ViLBertForTasks
from tests.components.test_data_tasks import files_of, train_step
from tests.components.test_data_world import BROKEN, TINY, World, shared_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


# --- RefCOCO+ -----------------------------------------------------------------------------------------------


def test_iou_targets_by_hand() -> None:
    whole = [0.0, 0.0, 100.0, 100.0]
    regions = torch.tensor([whole, [0, 0, 10, 10], [0, 0, 10, 20], [5, 0, 15, 10], [50, 50, 60, 60.0]])
    target = xywh_to_xyxy([0, 0, 10, 10])
    assert target.tolist() == [0, 0, 10, 10]
    hard, iou = grounding_targets(regions, target)
    # IoU: whole 100/10000; same box 1; [0,0,10,20] 100/200 = 0.5 (counts: >=); half-shifted 50/150; disjoint 0
    assert torch.allclose(iou, torch.tensor([0.01, 1.0, 0.5, 1 / 3, 0.0]))
    assert hard.tolist() == [0, 1, 1, 0, 0]
    soft, _ = grounding_targets(regions, target, soft=True)
    assert torch.allclose(soft, torch.tensor([0, 1.0, 0.5, 0, 0]))
    big, iou = grounding_targets(regions, torch.tensor([0.0, 0.0, 100.0, 90.0]))
    assert iou[0] == pytest.approx(0.9) and big[0] == 0  # region 0 is never a target


def test_refcoco_items_find_the_referred_box_and_train(world: World) -> None:
    ds = RefCOCODataset(files_of(world), world.regions(), world.tokenizer)
    assert ds.report.dropped == {"rejected": 1} and ds.report.reconciled
    assert int(BROKEN["refcoco+_refs"]) not in {it["ref_id"] for it in ds.items}
    assert len(ds) >= ds.report.kept  # one item per sentence
    # the world's store holds every object's box: each expression has a region with IoU 1
    assert ds.items_without_target() == 0
    item = ds[0]
    targets, meta = item["labels"]["grounding_targets"], item["meta"]
    assert targets[0] == 0 and targets.sum() >= 1
    assert torch.equal(meta["pixel_boxes"][targets.argmax()], meta["target_box"])
    assert meta["pixel_boxes"][0].tolist() == [0, 0, 64, 64]
    batch = Collator()([ds[i] for i in range(4)])
    logits = torch.where(batch["labels"]["grounding_targets"] > 0, 5.0, 0.0)[..., None]
    logits[:, 0] = 100.0  # region 0 is never chosen
    hits, boxes = grounding_hits(logits, batch)
    assert hits.all() and torch.equal(boxes, batch["meta"]["target_box"])
    train_step(ds, "refcoco+")


def test_refcoco_empty_split(world: World) -> None:
    with pytest.raises(EmptySplitError, match="RefCOCO\\+ refs: split 'testB' has no usable rows"):
        RefCOCODataset(files_of(world), world.regions(), world.tokenizer, RefCOCODataConfig(split="testB"))


# --- retrieval ----------------------------------------------------------------------------------------------


def test_word_neighbours_by_hand() -> None:
    texts = ["a red circle", "a red circle and a star", "a blue square", "the blue square is small", "a"]
    near = word_neighbours(texts, k=2)
    assert near[0][0] == 1 and near[1][0] == 0 and near[2][0] == 3 and near[3][0] == 2
    assert all(i not in row for i, row in enumerate(near)) and all(len(row) == 2 for row in near)
    assert word_neighbours(["only one"], k=5) == [[]]


def test_four_way_items_are_built_as_the_paper(world: World) -> None:
    ds = RetrievalTrainDataset(files_of(world), world.regions(), world.tokenizer)
    split = ds.split
    assert ds.report.dropped == {"rejected": 1} and len(ds) == 5 * ds.report.kept
    tok = world.tokenizer
    random_images = set()
    for epoch in range(3):
        for index in range(len(ds)):
            item = ds[(epoch, index)]
            meta = item["meta"]
            image = split.caption_image[index]
            caps, imgs = meta["choice_captions"], meta["choice_images"]
            mine = split.image_ids[image]
            assert caps[0] == caps[2] == index and imgs == [mine, mine, imgs[2], mine]
            assert split.caption_image[caps[1]] != image  # a random caption of another image
            assert imgs[2] != mine  # a random other image
            assert split.caption_image[caps[3]] in ds.hard_pool[image]  # a caption of a hard negative
            random_images.add(imgs[2])
            assert int(item["labels"]["choice"]) == 0
            want = tok(split.captions[caps[1]], truncation=True, max_length=30)["input_ids"]
            assert item["input_ids"][1][: len(want)].tolist() == want
            regions = world.regions()[imgs[2]]
            assert torch.equal(item["features"][2][: regions.num_regions], regions.features)
    assert len(random_images) > 5
    assert torch.equal(ds[(1, 3)]["input_ids"], ds[(1, 3)]["input_ids"])
    train_step(ds, "retrieval", size=3)


def test_near_duplicates_come_first_in_the_hard_pool(world: World) -> None:
    ds = RetrievalTrainDataset(files_of(world), world.regions(), world.tokenizer, RetrievalDataConfig(split="test"))
    pairs = [(i, j) for i, dups in enumerate(ds.split.near_duplicates) for j in dups]
    assert pairs, "the synthetic test split has a near-duplicate distractor"
    for i, j in pairs:
        assert ds.hard_pool[i][0] == j


def test_gallery_scores_every_caption_against_every_image(world: World) -> None:
    gallery = RetrievalGallery(files_of(world), world.regions(), world.tokenizer, RetrievalDataConfig(split="test"))
    n_captions, n_images = len(gallery.captions), len(gallery.image_ids)
    assert n_captions == 5 * n_images and gallery.num_pairs == n_captions * n_images
    torch.manual_seed(0)
    model = ViLBertForTasks(TINY, num_answers=2).eval()
    scores = np.full((n_captions, n_images), np.nan)
    seen = []
    for rank in range(2):
        for batch in gallery.batches(batch_size=3, rank=rank, world_size=2):
            with torch.no_grad():
                out = model(**model_inputs(batch), heads=("pair", "alignment"))
            c, i = batch["meta"]["caption_index"], batch["meta"]["image_index"]
            scores[c.numpy(), i.numpy()] = pair_scores(out).numpy()
            assert ((pair_scores(out, zero_shot=True) >= 0) & (pair_scores(out, zero_shot=True) <= 1)).all()
            seen += list(zip(c.tolist(), i.tolist(), strict=True))
    assert sorted(seen) == [(c, i) for c in range(n_captions) for i in range(n_images)]  # each pair once
    result = retrieval_scores(scores, gallery.caption_image)
    assert result["num_captions"] == n_captions and result["num_images"] == n_images
    for c, i in enumerate(gallery.caption_image):
        assert c in gallery.image_captions[i]


def test_retrieval_bad_input(world: World) -> None:
    with pytest.raises(EmptySplitError, match="Flickr30k images: split 'nope'"):
        RetrievalGallery(files_of(world), world.regions(), world.tokenizer, RetrievalDataConfig(split="nope"))
    with pytest.raises(ValueError, match="hard_pool_size"):
        RetrievalDataConfig(hard_pool_size=0)
    assert TASKS["retrieval"].heads == ("pair",) and isinstance(TaskFiles(world.root).root, str)
