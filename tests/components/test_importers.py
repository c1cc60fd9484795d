"""Importing bottom-up TSV, ViLBERT LMDB and HDF5 features: fixtures in the real encodings, bad records quarantined."""

from __future__ import annotations

import base64
import csv
import json
import os
import pickle
import sys
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from components.features import FeatureStore
from components.features.importers import (
    BOTTOM_UP_FIELDS,
    ImportConfig,
    MissingClassProbs,
    UnsafePickleError,
    import_features,
    safe_loads,
)

D, C = 32, 9  # small stand-ins for 2048 features and 1601 Visual Genome classes
SIZES = {"feature_size": D, "num_classes": C, "min_boxes": 1, "max_boxes": 10}
TSV_FIELDS = [*BOTTOM_UP_FIELDS, "cls_prob"]  # the order ViLBERT's scripts use: image_w before image_h


def image(i: int, boxes: int | None = None) -> dict:
    """One image's detector output as float32 arrays, like bottom-up-attention's generate_tsv.py produces."""
    rng = np.random.default_rng(i)
    r = boxes if boxes is not None else int(rng.integers(3, 11))
    w, h = 500 + i, 375 + i
    x1y1 = rng.random((r, 2)) * [w / 2, h / 2]
    probs = rng.random((r, C)).astype(np.float32)
    return {
        "image_id": str(391895 + i),
        "image_w": w,
        "image_h": h,
        "boxes": np.concatenate([x1y1, x1y1 + rng.random((r, 2)) * [w / 2 - 1, h / 2 - 1]], 1).astype(np.float32),
        "features": (rng.gamma(1.0, 2.0, (r, D)) * (rng.random((r, D)) > 0.3)).astype(np.float32),  # ReLU-like
        "cls_prob": probs / probs.sum(1, keepdims=True),
    }


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode("ascii")


def tsv_row(img: dict, with_cls: bool = True) -> dict:
    row = {k: img[k] for k in ("image_id", "image_w", "image_h")}
    row.update(num_boxes=len(img["boxes"]), boxes=b64(img["boxes"]), features=b64(img["features"]))
    if with_cls:
        row["cls_prob"] = b64(img["cls_prob"])
    return row


def write_tsv(path: Path, rows: list[dict], with_cls: bool = True) -> Path:
    """csv.DictWriter with tab delimiter and default \\r\\n line ends, as bottom-up's generate_tsv.py writes."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=TSV_FIELDS if with_cls else list(BOTTOM_UP_FIELDS))
        for row in rows:
            writer.writerow(row)
    return path


def good_and_bad_rows() -> tuple[list[dict], list[dict], dict[str, str]]:
    """Valid images, TSV rows including broken ones, and the expected quarantine code per broken image id."""
    good = [image(i) for i in range(8)]
    rows = [tsv_row(img) for img in good]
    expected: dict[str, str] = {}

    def bad(i: int, code: str, **changes) -> None:
        img = image(i, boxes=4)
        row = tsv_row(img)
        for key, value in changes.items():
            row[key] = value(img, row) if callable(value) else value
        rows.append(row)
        expected[row["image_id"]] = code

    nan = image(100, boxes=4)["features"].copy()
    nan[2, 5] = np.nan
    bad(100, "non_finite", features=b64(nan))
    bad(101, "wrong_shape", features=lambda img, row: b64(np.ones((4, D + 1), np.float32)))
    bad(102, "decode_error", features=lambda img, row: row["features"][:-3])  # truncated base64
    bad(103, "box_outside_image", boxes=lambda img, row: b64(img["boxes"] + [0, 0, img["image_w"], 0]))
    bad(104, "bad_field", num_boxes="four")
    bad(105, "box_count", num_boxes=0, boxes="", features="", cls_prob="")
    bad(106, "class_probs", cls_prob=lambda img, row: b64(img["cls_prob"] * 3))
    rows.append(tsv_row(good[2]))  # the same image again: a duplicate id
    return good, rows, expected


def assert_store_matches(store: FeatureStore, images: list[dict], uniform: bool = False) -> None:
    for img in images:
        got = store[img["image_id"]]
        assert (got.image_w, got.image_h) == (img["image_w"], img["image_h"])
        assert np.array_equal(got.boxes, img["boxes"])
        assert np.array_equal(got.features.view(np.uint16), img["features"].astype(np.float16).view(np.uint16))
        probs = np.full_like(img["cls_prob"], 1 / C) if uniform else img["cls_prob"]
        assert np.array_equal(got.class_probs.view(np.uint16), probs.astype(np.float16).view(np.uint16))


def assert_quarantine(path: Path, expected: dict[str, str], duplicate: str | None) -> None:
    rows = pq.read_table(path).to_pylist()
    by_id = {(r["image_id"], r["code"]): r for r in rows}
    for image_id, code in expected.items():
        row = by_id[(image_id, code)]
        assert row["reason"].startswith(code + ": ") and row["source"] and row["row_id"]
    if duplicate is not None:
        assert "also at" in by_id[(duplicate, "duplicate_id")]["reason"]
    assert len(rows) == len(expected) + (duplicate is not None)


def test_tsv_import_is_bit_exact_and_quarantines_bad_rows(tmp_path):
    good, rows, expected = good_and_bad_rows()
    src = write_tsv(tmp_path / "karpathy_train_resnet101_faster_rcnn_genome.tsv.0", rows)
    result = import_features(src, "tsv", tmp_path / "store", **SIZES)
    assert (result.seen, result.imported, result.skipped_existing) == (len(rows), len(good), 0)
    assert result.quarantined == len(expected) + 1 == result.seen - result.imported
    assert result.reasons["duplicate_id"] == 1 and result.reasons["decode_error"] == 1
    store = FeatureStore.open(tmp_path / "store")
    assert store.spec.backend == "import:tsv" and not store.spec.uniform_class_probs
    assert sorted(store.image_ids()) == sorted(img["image_id"] for img in good)
    assert_store_matches(store, good)
    assert_quarantine(tmp_path / "store" / "quarantine.parquet", expected, duplicate=good[2]["image_id"])
    report = json.loads((tmp_path / "store" / "import_report.json").read_text())
    assert report["seen"] == report["imported"] + report["skipped_existing"] + report["quarantined"]

    again = import_features(src, "tsv", tmp_path / "store", **SIZES)  # a rerun (e.g. after a crash) redoes nothing
    assert (again.imported, again.skipped_existing, again.quarantined) == (0, len(good), result.quarantined)
    assert len(FeatureStore(tmp_path / "store")) == len(good)


def test_tsv_in_several_parts_and_python3_bytes_repr(tmp_path):
    imgs = [image(i) for i in range(6)]
    part0 = write_tsv(tmp_path / "f.tsv.0", [tsv_row(img) for img in imgs[:3]])
    rows = []
    for img in imgs[3:]:  # Python 3 csv around b64encode() bytes writes "b'...'"
        row = tsv_row(img)
        rows.append({k: (v.encode() if k in ("boxes", "features", "cls_prob") else v) for k, v in row.items()})
    part1 = write_tsv(tmp_path / "f.tsv.1", rows)
    assert "\tb'" in part1.read_text()
    result = import_features([part0, part1], "tsv", tmp_path / "store", **SIZES)
    assert result.imported == 6 and result.quarantined == 0
    assert_store_matches(FeatureStore(tmp_path / "store"), imgs)


def test_tsv_without_class_probs_needs_the_uniform_flag(tmp_path):
    imgs = [image(i) for i in range(3)]
    src = write_tsv(tmp_path / "test2015.tsv", [tsv_row(img, with_cls=False) for img in imgs], with_cls=False)
    with pytest.raises(MissingClassProbs, match="allow_uniform_class_probs"):
        import_features(src, "tsv", tmp_path / "store", **SIZES)
    assert not (tmp_path / "store").exists()  # refused before anything was written
    result = import_features(src, "tsv", tmp_path / "store", allow_uniform_class_probs=True, **SIZES)
    assert result.imported == 3 and result.spec["backend"] == "import:tsv+uniform-class-probs"
    store = FeatureStore(tmp_path / "store")
    assert store.spec.uniform_class_probs
    assert_store_matches(store, imgs, uniform=True)


def write_vilbert_lmdb(path: Path, tsv: Path, extra: dict[bytes, bytes] | None = None, extra_keys=()) -> None:
    """What jiasenlu/vilbert_beta script/convert_*_lmdb.py does: csv.DictReader rows, pickled, plus b'keys'."""
    csv.field_size_limit(sys.maxsize)
    env = lmdb.open(str(path), map_size=1 << 28)
    ids = []
    with env.begin(write=True) as txn, tsv.open() as f:
        for item in csv.DictReader(f, delimiter="\t", fieldnames=TSV_FIELDS):
            key = str(item["image_id"]).encode()
            ids.append(key)
            txn.put(key, pickle.dumps(item), dupdata=True)  # a duplicate id overwrites, as in the original
        for key, value in (extra or {}).items():
            ids.append(key)
            txn.put(key, value)
        txn.put(b"keys", pickle.dumps(ids + list(extra_keys)))
    env.close()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_lmdb_import_uses_a_restricted_unpickler(tmp_path):
    good, rows, expected = good_and_bad_rows()
    rows = [r for r in rows[:-1]]  # LMDB keys are unique: the duplicate row cannot exist there
    tsv = write_tsv(tmp_path / "refcoco+.tsv", rows)
    marker = tmp_path / "pwned"
    extra = {b"666": pickle.dumps(_Evil(marker)), b"667": pickle.dumps(["not", "a", "dict"]), b"668": b"\x80\x04garb"}
    write_vilbert_lmdb(tmp_path / "refcoco+.lmdb", tsv, extra, extra_keys=[b"999"])
    result = import_features(tmp_path / "refcoco+.lmdb", "lmdb", tmp_path / "store", **SIZES)
    assert not marker.exists()  # the pickle's payload never ran
    expected.update({"666": "unsafe_pickle", "667": "bad_record", "668": "decode_error", "999": "missing_value"})
    assert (result.seen, result.imported, result.quarantined) == (len(rows) + 4, len(good), len(expected))
    assert_quarantine(tmp_path / "store" / "quarantine.parquet", expected, duplicate=None)
    store = FeatureStore(tmp_path / "store")
    assert store.spec.backend == "import:lmdb"
    assert_store_matches(store, good)


def test_lmdb_multi_task_layout_with_numpy_arrays(tmp_path):
    """vilbert-multi-task's convert_to_lmdb.py pickles numpy arrays (no cls_prob) instead of base64 text."""
    imgs = [image(i) for i in range(4)]
    env = lmdb.open(str(tmp_path / "feat.lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for img in imgs:
            item = {"image_id": int(img["image_id"]), "image_h": img["image_h"], "image_w": img["image_w"],
                    "num_boxes": np.int64(len(img["boxes"])), "boxes": img["boxes"], "features": img["features"]}  # fmt: skip
            txn.put(img["image_id"].encode(), pickle.dumps(item))
        txn.put(b"keys", pickle.dumps([img["image_id"].encode() for img in imgs]))
    env.close()
    result = import_features(
        tmp_path / "feat.lmdb", "lmdb", tmp_path / "store", allow_uniform_class_probs=True, **SIZES
    )
    assert result.imported == 4 and result.quarantined == 0
    assert_store_matches(FeatureStore(tmp_path / "store"), imgs, uniform=True)


def test_hdf5_flat_layout(tmp_path):
    imgs = [image(i) for i in range(5)]
    k = max(len(img["boxes"]) for img in imgs)

    def padded(name: str, cols: int) -> np.ndarray:
        out = np.zeros((len(imgs), k, cols), np.float32)
        for i, img in enumerate(imgs):
            out[i, : len(img[name])] = img[name]
        return out

    features = padded("features", D)
    features[4, 0, 0] = np.nan  # one broken image
    with h5py.File(tmp_path / "trainval_36.h5", "w") as f:
        f["image_id"] = np.array([int(img["image_id"]) for img in imgs])
        f["image_w"] = [img["image_w"] for img in imgs]
        f["image_h"] = [img["image_h"] for img in imgs]
        f["num_boxes"] = [len(img["boxes"]) for img in imgs]
        f["boxes"], f["features"], f["cls_prob"] = padded("boxes", 4), features, padded("cls_prob", C)
    result = import_features(tmp_path / "trainval_36.h5", "hdf5", tmp_path / "store", **SIZES)
    assert (result.imported, result.quarantined, result.reasons) == (4, 1, {"non_finite": 1})
    assert_store_matches(FeatureStore(tmp_path / "store"), imgs[:4])


def test_hdf5_group_per_image_layout(tmp_path):
    imgs = [image(i) for i in range(4)]
    with h5py.File(tmp_path / "groups.h5", "w") as f:
        for img in imgs:
            group = f.create_group(img["image_id"])
            group["features"], group["boxes"], group["cls_prob"] = img["features"], img["boxes"], img["cls_prob"]
            group.attrs["image_w"], group.attrs["image_h"] = img["image_w"], img["image_h"]
        f.create_group("9999")["features"] = np.ones((2, D + 3), np.float32)  # wrong width
    result = import_features(tmp_path / "groups.h5", "hdf5", tmp_path / "store", **SIZES)
    assert (result.imported, result.quarantined) == (4, 1) and result.reasons == {"wrong_shape": 1}
    assert_store_matches(FeatureStore(tmp_path / "store"), imgs)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_loads_rebuilds_numpy_and_refuses_code(protocol, tmp_path):
    value = {"features": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(2), "id": b"1", "s": "x"}
    got = safe_loads(pickle.dumps(value, protocol=protocol))
    assert np.array_equal(got["features"], value["features"]) and got["n"] == 2 and got["id"] == b"1"
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match=r"(builtins|io)\.open"):
        safe_loads(pickle.dumps(_Evil(marker), protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        safe_loads(pickle.dumps(os.system, protocol=protocol))
    assert not marker.exists()


def test_config_validation():
    with pytest.raises(ValueError, match="fmt"):
        ImportConfig(("a.tsv",), "csv", "store")
    with pytest.raises(ValueError, match="sources"):
        ImportConfig("a.tsv", "tsv", "store")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="FeatureSpec"):
        ImportConfig(("a.tsv",), "tsv", "store", max_boxes=0)
