"""The feature-store suite: bad records of every kind are quarantined with the right reason.

The first test reads a store through the protocol the suite needs (an in-memory store built here); the
second writes a real store with ``components.features.store`` and corrupts its bytes on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from components.features.spec import FeatureSpec, RegionFeatures
from components.features.store import FeatureStoreWriter
from components.steps.validate import ValidateConfig, ValidationFailed, run_validate
from components.validation import ValidationLimits
from tests.components.steps.test_validate_fixtures import H, W, image_id, make_world

D, C = 8, 5


@dataclass
class Record:
    """Shaped like ``RegionFeatures``."""

    image_id: str
    boxes: np.ndarray
    features: np.ndarray
    class_probs: np.ndarray
    image_w: int
    image_h: int


def good_record(image: str, regions: int = 12, seed: int = 0) -> Record:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 20, (regions, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 15, (regions, 2))], axis=1).astype(np.float32)
    logits = rng.normal(size=(regions, C))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float16)  # fp16: sums are not exactly 1
    feats = rng.normal(size=(regions, D)).astype(np.float16)
    return Record(image, boxes, feats, probs, W, H)


class MemoryStore:
    def __init__(self, records: list[Record]):
        self.spec = SimpleNamespace(feature_size=D, num_classes=C, min_boxes=1, max_boxes=50)
        self.records = {r.image_id: r for r in records}

    def image_ids(self) -> list[str]:
        return list(self.records)

    def __getitem__(self, image_id: str) -> Record:
        return self.records[image_id]


def _quarantine(out) -> dict[str, list[str]]:
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    return {r["row_id"]: r["reasons"] for r in rows if r["table"] == "features"}


def test_bad_feature_records_are_quarantined(tmp_path) -> None:
    world = make_world(14, tasks=False)
    world.image_row(image_id(13))["sha256"] = "0" * 64  # its features then belong to a rejected image
    root = world.write(tmp_path / "data")
    records = [good_record(image_id(i), seed=i) for i in range(14)]
    expected = {}
    records[1].features[3, 2] = np.nan
    expected[image_id(1)] = ["non_finite_features"]
    records[2] = good_record(image_id(2), regions=5)
    expected[image_id(2)] = ["region_count_out_of_range"]
    records[3] = good_record(image_id(3), regions=37)
    expected[image_id(3)] = ["region_count_out_of_range"]
    records[4].class_probs = (records[4].class_probs * np.float16(0.9)).astype(np.float16)
    expected[image_id(4)] = ["class_probs_not_normalized"]
    records[5].boxes[0] = [10, 10, W + 5, 20]
    expected[image_id(5)] = ["box_outside_image"]
    records[6].features = np.zeros((12, D + 1), np.float16)
    expected[image_id(6)] = ["feature_dim_mismatch"]
    records[7].class_probs = np.full((12, C + 2), 1 / (C + 2), np.float16)
    expected[image_id(7)] = ["class_dim_mismatch"]
    records[8].image_w = W * 2
    expected[image_id(8)] = ["image_size_mismatch"]
    records[9].boxes[2] = [20, 20, 10, 30]
    expected[image_id(9)] = ["degenerate_box"]
    records[10].class_probs[0] = [1.5, -0.5, 0, 0, 0]
    expected[image_id(10)] = ["negative_class_prob"]
    records.append(good_record("not-in-manifest"))
    expected["not-in-manifest"] = ["unknown_image"]
    expected[image_id(13)] = ["image_quarantined"]
    store = MemoryStore(records)

    out = tmp_path / "out"
    limits = ValidationLimits(max_bad_fraction=1.0)
    config = ValidateConfig(dataset=str(root), output=str(out), tasks=False, data_docs=False, limits=limits)
    result = run_validate(config, feature_store=store)
    assert _quarantine(out) == expected
    counts = result.tables["features"]
    assert (counts.input_rows, counts.accepted, counts.quarantined) == (15, 15 - len(expected), len(expected))
    assert result.report["feature_spec"] == {"feature_size": D, "num_classes": C, "min_boxes": 1, "max_boxes": 50}
    # with the default limit, 12 bad records of 15 fail the step
    with pytest.raises(ValidationFailed, match="features: too many bad rows: 12 of 15"):
        run_validate(
            ValidateConfig(dataset=str(root), output=str(out), tasks=False, data_docs=False), feature_store=store
        )


def test_real_feature_store_with_corrupted_bytes(tmp_path) -> None:
    world = make_world(6, tasks=False)
    root = world.write(tmp_path / "data")
    spec = FeatureSpec(backend="demo", weights_sha256=None, feature_size=D, num_classes=C, min_boxes=1, max_boxes=40)
    store_dir = tmp_path / "store"
    with FeatureStoreWriter(store_dir, spec) as writer:
        for i in range(6):
            r = good_record(image_id(i), regions=4 if i == 5 else 12, seed=i)
            writer.add(RegionFeatures(r.image_id, r.boxes, r.features, r.class_probs, r.image_w, r.image_h))
    index = {row["image_id"]: row for row in pq.read_table(store_dir / "index.parquet").to_pylist()}
    # flip bytes on disk, as a bad disk or a partial copy would: a NaN feature in image 2, a huge box in image 3
    for image, offset, value in (
        (image_id(2), 12 * 16, np.array([np.nan], np.float16).tobytes()),  # first feature value
        (image_id(3), 8, np.array([1000.0], np.float32).tobytes()),  # x2 of the first box
    ):
        row = index[image]
        with open(store_dir / "shards" / row["shard"], "r+b") as f:
            f.seek(row["offset"] + offset)
            f.write(value)

    out = tmp_path / "out"
    limits = ValidationLimits(max_bad_fraction=1.0)
    result = run_validate(
        ValidateConfig(
            dataset=str(root), output=str(out), features=str(store_dir), tasks=False, data_docs=False, limits=limits
        )
    )
    assert _quarantine(out) == {
        image_id(2): ["checksum_mismatch", "non_finite_features"],
        image_id(3): ["checksum_mismatch", "box_outside_image"],
        image_id(5): ["region_count_out_of_range"],
    }
    assert result.tables["features"].accepted == 3
    report = json.loads((out / "validation_report.json").read_text())
    assert report["feature_spec"]["backend"] == "demo" and report["features"] == str(store_dir)

    # a store that cannot be opened is a dataset-level failure, not a crash
    with pytest.raises(ValidationFailed, match="features: cannot open"):
        run_validate(ValidateConfig(dataset=str(root), output=str(out), features=str(tmp_path / "nope"), tasks=False))
