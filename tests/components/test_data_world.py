"""A tiny synthetic world for the data tests (ingest -> validate -> feature store), built once per session, and
the tests of the region inputs and the collator.

The world: ``synthetic://shapes?seed=0&n=24&size=64`` ingested for real; a few task rows are broken before the
real validate step runs (so ``rejected_row_ids`` has something to say); a feature store with the ``tiny``
preset's sizes whose regions include each image's ground-truth object boxes (so grounding has targets) plus
random boxes; a WordPiece tokenizer small enough for the ``tiny`` model's 128-token vocabulary.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.data.collate import Collator, model_inputs
from components.data.common import DataError
from components.data.regions import BLIND_MODES, RegionDataError, RegionSource, region_inputs
from components.features import FeatureSpec, FeatureSpecMismatch, FeatureStoreWriter, RegionFeatures
from model import preset
from model.tokenizer import load_tokenizer

SOURCE = "synthetic://shapes?seed=0&n=24&size=64"
TINY = preset("tiny")
SPEC = FeatureSpec("demo", None, feature_size=TINY.vision.feature_size, num_classes=TINY.vision.target_size,
                   min_boxes=1, max_boxes=12)  # fmt: skip
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: Task rows broken before validation: table -> row id that validation must quarantine.
BROKEN = {"vqa_questions": "1", "vcr": "train-3", "refcoco+_refs": "100", "flickr30k": "5"}


@dataclass
class World:
    root: Path
    validation: Path
    store: Path
    tokenizer_dir: Path

    @property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    def regions(self, max_regions: int = 37) -> RegionSource:
        return RegionSource(self.store, TINY, max_regions=max_regions)


_CACHE: dict[str, World] = {}


def _break_task_rows(root: Path) -> None:
    """One bad row per task table (each a rule validation enforces)."""
    path = root / "tasks/vqa/v2_OpenEnded_mscoco_train_questions.json"
    data = json.loads(path.read_text())
    next(q for q in data["questions"] if q["question_id"] == 1)["image_id"] = 987654  # unknown_image
    path.write_text(json.dumps(data))
    path = root / "tasks/vcr/train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    next(r for r in rows if r["annot_id"] == "train-3")["answer_label"] = 7  # label outside 0..3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = root / "tasks/refcoco+/refs(unc).json"
    refs = json.loads(path.read_text())
    next(r for r in refs if r["ref_id"] == 100)["ann_id"] = 123456789  # unknown annotation
    path.write_text(json.dumps(refs))
    path = root / "tasks/flickr30k/dataset_flickr30k.json"
    data = json.loads(path.read_text())
    next(e for e in data["images"] if e["imgid"] == 5)["filename"] = "no-such-image.png"  # unknown_image
    path.write_text(json.dumps(data))


def task_texts(root: Path) -> list[str]:
    """Every sentence of the world (captions, questions, answers, expressions)."""
    texts = pq.read_table(root / "captions.parquet").column("caption").to_pylist()
    for split in ("train", "val", "test"):
        texts += [q["question"] for q in json.loads((root / f"tasks/vqa/v2_OpenEnded_mscoco_{split}_questions.json")
                                                    .read_text())["questions"]]  # fmt: skip
        for line in (root / f"tasks/vcr/{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            texts += [row["question"], *row["answer_choices"]]
    texts += [
        s["raw"] for r in json.loads((root / "tasks/refcoco+/refs(unc).json").read_text()) for s in r["sentences"]
    ]
    flickr = json.loads((root / "tasks/flickr30k/dataset_flickr30k.json").read_text())
    return texts + [s["raw"] for e in flickr["images"] for s in e["sentences"]]


def make_tokenizer(texts: list[str], folder: Path, size: int) -> Path:
    """A real WordPiece tokenizer of ``size`` tokens: specials, letters (so nothing is [UNK]), frequent words."""
    from transformers import BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    base = SPECIALS + list(".,?:-'") + letters + ["##" + c for c in letters]
    counts = Counter(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))
    words = [w for w, _ in counts.most_common() if w not in base][: size - len(base)]
    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(base + words)}).save_pretrained(str(folder))
    return folder


def write_store(root: Path, store: Path, spec: FeatureSpec = SPEC, skip: frozenset[str] = frozenset()) -> None:
    """Random features for every manifest image; the first regions are the image's object boxes."""
    instances = json.loads((root / "annotations/instances.json").read_text())
    objects: dict[int, list[list[float]]] = {}
    for a in instances["annotations"]:
        x, y, w, h = a["bbox"]
        objects.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    with FeatureStoreWriter(store, spec) as writer:
        for row in manifest:
            if row["image_id"] in skip:
                continue
            index = int(row["image_id"].split("-")[1])
            rng = np.random.default_rng(index)
            w, h = row["width"], row["height"]
            boxes = objects.get(index, [])[: spec.max_boxes - 2]
            for _ in range(int(rng.integers(1, 3))):  # plus 1-2 random boxes
                x1, y1 = rng.random(2) * [w / 2, h / 2]
                boxes.append([x1, y1, x1 + rng.random() * w / 2, y1 + rng.random() * h / 2])
            r = len(boxes)
            probs = rng.random((r, spec.num_classes)) + 0.05
            writer.add(
                RegionFeatures(
                    image_id=row["image_id"],
                    boxes=np.asarray(boxes, dtype=np.float32),
                    features=rng.standard_normal((r, spec.feature_size)).astype(np.float32),
                    class_probs=(probs / probs.sum(1, keepdims=True)).astype(np.float32),
                    image_w=w,
                    image_h=h,
                )
            )


def build_world(base: Path) -> World:
    from components.steps.ingest import IngestConfig, run_ingest
    from components.steps.validate import ValidateConfig, run_validate
    from components.validation import ValidationLimits

    root = base / "data"
    run_ingest(IngestConfig(source=SOURCE, output=str(root), progress=False, workers=2))
    _break_task_rows(root)
    validation = base / "validation"
    result = run_validate(
        ValidateConfig(
            dataset=str(root),
            output=str(validation),
            data_docs=False,
            workers=2,
            limits=ValidationLimits(max_bad_fraction=1.0),
        )
    )
    assert result.passed, result.failures
    write_store(root, base / "store")
    tokenizer = make_tokenizer(task_texts(root), base / "tokenizer", TINY.text.vocab_size)
    return World(root, validation, base / "store", tokenizer)


def shared_world(tmp_path_factory) -> World:
    """The world, built once per test session (every data test module's ``world`` fixture returns it)."""
    if "world" not in _CACHE:
        _CACHE["world"] = build_world(tmp_path_factory.mktemp("data_world"))
    return _CACHE["world"]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


# --- the world itself ---------------------------------------------------------------------------------------


def test_world_is_what_the_other_tests_assume(world: World) -> None:
    from components.validation import rejected_row_ids

    for table, row_id in BROKEN.items():
        assert row_id in rejected_row_ids(world.validation, table), table
    tok = world.tokenizer
    assert len(tok) == TINY.text.vocab_size
    ids = tok("a large red circle beneath the square")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids


# --- regions ------------------------------------------------------------------------------------------------


def _record(r: int = 3, w: int = 100, h: int = 50) -> RegionFeatures:
    boxes = np.array([[0, 0, 50, 25], [50, 25, 100, 50], [10, 10, 20, 20], [0, 0, 100, 50]][:r], dtype=np.float32)
    features = np.arange(r * 4, dtype=np.float32).reshape(r, 4)
    probs = np.full((r, 2), 0.5, dtype=np.float32)
    probs[0] = [1.0, 0.0]
    return RegionFeatures("img", boxes, features, probs, w, h)


def test_region_inputs_prepend_the_whole_image_and_normalise_boxes() -> None:
    got = region_inputs(_record())
    assert got.num_regions == 4 and got.features.dtype == torch.float32
    assert torch.equal(got.features[0], torch.tensor([4.0, 5.0, 6.0, 7.0]))  # mean of the three regions
    assert torch.equal(got.features[1:], torch.arange(12.0).view(3, 4))
    assert torch.equal(got.boxes[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(got.boxes[1], torch.tensor([0.0, 0.0, 0.5, 0.5, 0.25]))
    assert torch.allclose(got.boxes[3], torch.tensor([0.1, 0.2, 0.2, 0.4, 0.02]))
    assert torch.equal(got.pixel_boxes[0], torch.tensor([0.0, 0.0, 100.0, 50.0]))
    assert torch.equal(got.region_mask, torch.ones(4, dtype=torch.long))
    assert torch.allclose(got.class_probs[0], torch.tensor([2 / 3, 1 / 3]))


def test_region_inputs_cap_after_averaging_over_all_regions() -> None:
    got = region_inputs(_record(r=4), max_regions=3)
    assert got.num_regions == 3
    assert torch.equal(got.features[0], torch.tensor([6.0, 7.0, 8.0, 9.0]))  # mean over all 4 stored regions
    assert torch.equal(got.features[1:], torch.arange(8.0).view(2, 4))


def test_region_inputs_refuse_a_record_without_boxes() -> None:
    empty = RegionFeatures("empty", np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32),
                           np.zeros((0, 2), np.float32), 10, 10)  # fmt: skip
    with pytest.raises(RegionDataError, match="'empty' has no regions"):
        region_inputs(empty)


def test_region_source_checks_the_spec_and_survives_pickling(world: World, tmp_path) -> None:
    regions = world.regions(max_regions=5)
    got = regions["syn-000003"]
    assert got.features.shape == (min(5, got.num_regions), TINY.vision.feature_size)
    copy = pickle.loads(pickle.dumps(regions))
    assert copy._store is None and torch.equal(copy["syn-000003"].features, got.features)
    with pytest.raises(DataError, match="no features"):
        regions["syn-999999"]
    bigger = TINY.replace(vision=replace(TINY.vision, feature_size=32))
    with pytest.raises(FeatureSpecMismatch, match="feature_size 24 != model vision.feature_size 32"):
        RegionSource(world.store, bigger)


def test_blind_regions_keep_nothing_of_the_image_or_only_the_boxes(world: World) -> None:
    """The blind baselines' view: ``image`` is one all-zero whole-image region, the same for every image;
    ``position`` keeps every box and zeroes every feature.  An unknown mode is refused."""
    seeing = world.regions()["syn-000003"]
    views = {mode: RegionSource(world.store, TINY, blind=mode) for mode in BLIND_MODES}
    blind = [views["image"][i] for i in ("syn-000003", "syn-000004")]
    for got in blind:
        assert got.num_regions == 1 and not got.features.any() and not got.class_probs.any()
        assert got.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]] and got.region_mask.tolist() == [1]
    assert torch.equal(blind[0].features, blind[1].features) and torch.equal(blind[0].boxes, blind[1].boxes)
    boxes = views["position"]["syn-000003"]
    assert boxes.num_regions == seeing.num_regions > 1 and not boxes.features.any()
    assert torch.equal(boxes.boxes, seeing.boxes) and torch.equal(boxes.pixel_boxes, seeing.pixel_boxes)
    assert pickle.loads(pickle.dumps(views["position"])).blind == "position"
    with pytest.raises(ValueError, match="unknown blind mode 'deaf'"):
        RegionSource(world.store, TINY, blind="deaf")


# --- collator -----------------------------------------------------------------------------------------------


def _item(t: int, n: int, choices: int | None = None) -> dict:
    lead = () if choices is None else (choices,)
    return {
        "input_ids": torch.full((*lead, t), 7),
        "attention_mask": torch.ones((*lead, t), dtype=torch.long),
        "masked_lm_labels": torch.full((*lead, t), 3),
        "features": torch.ones((*lead, n, 4)),
        "region_mask": torch.ones((*lead, n), dtype=torch.long),
        "region_labels": torch.ones((*lead, n), dtype=torch.long),
        "labels": {"grounding_targets": torch.ones(n)} if choices is None else {"choice": torch.tensor(1)},
        "meta": {"id": f"x{t}"} if choices is None else {"id": f"x{t}", "num_choices": choices},
    }


def test_collator_pads_to_the_batch_or_to_fixed_lengths() -> None:
    batch = Collator(pad_token_id=0)([_item(3, 2), _item(5, 4)])
    assert batch["input_ids"].tolist() == [[7, 7, 7, 0, 0], [7] * 5]
    assert batch["masked_lm_labels"][0].tolist() == [3, 3, 3, -1, -1]
    assert batch["region_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["region_labels"][0].tolist() == [1, 1, -1, -1] and batch["features"].shape == (2, 4, 4)
    assert batch["labels"]["grounding_targets"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["meta"] == {"id": ["x3", "x5"]}
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "masked_lm_labels", "features",
                                        "region_mask", "region_labels"}  # fmt: skip
    fixed = Collator(pad_token_id=0, text_length=36, num_regions=37)([_item(3, 2)])
    assert fixed["input_ids"].shape == (1, 36) and fixed["features"].shape == (1, 37, 4)
    with pytest.raises(DataError, match="more than the fixed length 4"):
        Collator(text_length=4)([_item(5, 2)])


def test_collator_flattens_choices_item_major() -> None:
    a, b = _item(3, 2, choices=4), _item(5, 3, choices=4)
    a["input_ids"][2] = 9
    batch = Collator()([a, b])
    assert batch["input_ids"].shape == (8, 5) and batch["features"].shape == (8, 3, 4)
    assert batch["input_ids"][2].tolist() == [9, 9, 9, 0, 0]  # row b * 4 + k = item 0, choice 2
    assert batch["labels"]["choice"].tolist() == [1, 1] and batch["meta"]["num_choices"] == 4
    with pytest.raises(DataError, match="different numbers of choices"):
        Collator()([_item(3, 2), _item(3, 2, choices=4)])
