"""The feature store: spec, record validation, sharded writer, crash-safe resume, parts, memory-mapped reads."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.features import (
    CorruptStoreError,
    DuplicateImageError,
    FeatureSpec,
    FeatureSpecMismatch,
    FeatureStore,
    FeatureStoreWriter,
    InvalidRegionFeatures,
    RegionFeatures,
    merge_index,
)
from model import preset

SPEC = FeatureSpec("demo", None, feature_size=16, num_classes=7, min_boxes=2, max_boxes=6)


def make_record(i: int, spec: FeatureSpec = SPEC, boxes: int | None = None, seed: int = 0) -> RegionFeatures:
    """A valid record whose values depend on ``i`` (so mix-ups between images are visible)."""
    rng = np.random.default_rng(seed * 100_003 + i)
    r = boxes if boxes is not None else int(rng.integers(spec.min_boxes, spec.max_boxes + 1))
    w, h = 320 + i, 240 + i
    xy = rng.random((r, 2)) * [w / 2, h / 2]
    wh = rng.random((r, 2)) * [w / 2, h / 2]
    probs = rng.random((r, spec.num_classes)) + 1e-3
    return RegionFeatures(
        image_id=f"img-{i:04d}",
        boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32),
        features=(rng.standard_normal((r, spec.feature_size)) * 3).astype(np.float32),
        class_probs=(probs / probs.sum(1, keepdims=True)).astype(np.float32),
        image_w=w,
        image_h=h,
    )


def assert_stored(store: FeatureStore, rf: RegionFeatures) -> None:
    got = store[rf.image_id]
    assert got.image_id == rf.image_id and (got.image_w, got.image_h) == (rf.image_w, rf.image_h)
    assert got.boxes.dtype == np.float32 and np.array_equal(got.boxes, rf.boxes)
    assert got.features.dtype == np.float16 and got.class_probs.dtype == np.float16
    # bit-exact after fp16 rounding
    assert np.array_equal(got.features.view(np.uint16), rf.features.astype(np.float16).view(np.uint16))
    assert np.array_equal(got.class_probs.view(np.uint16), rf.class_probs.astype(np.float16).view(np.uint16))


def write_store(root: Path, records: list[RegionFeatures], **kwargs) -> None:
    with FeatureStoreWriter(root, SPEC, **kwargs) as writer:
        for rf in records:
            writer.add(rf)


# --- spec -----------------------------------------------------------------------------------------------------------


def test_spec_round_trip_and_hash():
    d = SPEC.to_dict()
    assert d == {"backend": "demo", "weights_sha256": None, "feature_size": 16, "num_classes": 7, "min_boxes": 2,
                 "max_boxes": 6, "version": 1}  # fmt: skip
    assert FeatureSpec.from_dict(json.loads(json.dumps(d))) == SPEC
    assert SPEC.sha256() == FeatureSpec.from_dict(d).sha256() and len(SPEC.sha256()) == 64
    assert replace(SPEC, max_boxes=7).sha256() != SPEC.sha256()
    assert not SPEC.uniform_class_probs and replace(SPEC, backend="import:tsv+uniform-class-probs").uniform_class_probs


@pytest.mark.parametrize(
    "changes",
    [
        {"backend": ""},
        {"backend": "Demo Backend"},
        {"weights_sha256": "abc"},
        {"feature_size": 0},
        {"num_classes": -1},
        {"min_boxes": 0},
        {"min_boxes": 7},
        {"feature_size": 16.0},
        {"version": 2},
    ],
)
def test_spec_rejects_bad_values(changes):
    with pytest.raises(ValueError, match="FeatureSpec"):
        replace(SPEC, **changes)


def test_spec_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        FeatureSpec.from_dict({**SPEC.to_dict(), "extra": 1})
    d = SPEC.to_dict()
    del d["num_classes"]
    with pytest.raises(ValueError, match="missing keys"):
        FeatureSpec.from_dict(d)


def test_check_model_names_the_mismatch():
    config = preset("tiny")
    good = replace(SPEC, feature_size=config.vision.feature_size, num_classes=config.vision.target_size)
    good.check_model(config)
    with pytest.raises(
        FeatureSpecMismatch, match=rf"feature_size 17 != model vision.feature_size {config.vision.feature_size}"
    ):
        replace(good, feature_size=17).check_model(config)
    with pytest.raises(FeatureSpecMismatch, match="num_classes 3 != model vision.target_size"):
        replace(good, num_classes=3).check_model(config)
    assert issubclass(FeatureSpecMismatch, ValueError)


# --- record validation ----------------------------------------------------------------------------------------------


def _broken(kind: str) -> RegionFeatures:
    rf = make_record(1, boxes=3)
    if kind == "zero_boxes":
        rf.boxes, rf.features, rf.class_probs = rf.boxes[:0], rf.features[:0], rf.class_probs[:0]
    elif kind == "too_many_boxes":
        big = make_record(1, replace(SPEC, max_boxes=9), boxes=9)
        rf.boxes, rf.features, rf.class_probs = big.boxes, big.features, big.class_probs
    elif kind == "wrong_d":
        rf.features = rf.features[:, :15]
    elif kind == "wrong_c":
        rf.class_probs = np.full((3, 8), 1 / 8, np.float32)
    elif kind == "ragged":
        rf.features = rf.features[:2]
    elif kind == "nan":
        rf.features[1, 2] = np.nan
    elif kind == "inf_box":
        rf.boxes[0, 0] = np.inf
    elif kind == "fp16_overflow":
        rf.features[0, 0] = 70000.0
    elif kind == "box_outside":
        rf.boxes[2, 2] = rf.image_w + 5
    elif kind == "negative_box":
        rf.boxes[0, 1] = -1
    elif kind == "flipped_box":
        rf.boxes[0] = [10, 10, 5, 20]
    elif kind == "class_sum":
        rf.class_probs = rf.class_probs * 0.5
    elif kind == "bad_id":
        rf.image_id = ""
    elif kind == "bad_size":
        rf.image_h = 0
    return rf


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("zero_boxes", "box_count"),
        ("too_many_boxes", "box_count"),
        ("wrong_d", "wrong_shape"),
        ("wrong_c", "wrong_shape"),
        ("ragged", "wrong_shape"),
        ("nan", "non_finite"),
        ("inf_box", "non_finite"),
        ("fp16_overflow", "fp16_overflow"),
        ("box_outside", "box_outside_image"),
        ("negative_box", "box_outside_image"),
        ("flipped_box", "box_outside_image"),
        ("class_sum", "class_probs"),
        ("bad_id", "bad_id"),
        ("bad_size", "bad_size"),
    ],
)
def test_validate_rejects_with_a_reason_code(kind, code):
    make_record(1, boxes=3).validate(SPEC)  # the unbroken record is fine
    with pytest.raises(InvalidRegionFeatures) as info:
        _broken(kind).validate(SPEC)
    assert info.value.code == code and str(info.value).startswith(code)


# --- writer and reader ----------------------------------------------------------------------------------------------


def test_round_trip_across_shards(tmp_path):
    records = [make_record(i) for i in range(25)]
    write_store(tmp_path, records, shard_bytes=2000)
    shards = sorted(p.name for p in (tmp_path / "shards").glob("*.bin"))
    assert len(shards) > 3 and shards[0] == "main-00000.bin"
    assert not list(tmp_path.rglob("*.tmp"))
    with FeatureStore.open(tmp_path) as store:
        assert len(store) == 25 and store.spec == SPEC
        assert store.image_ids() == [rf.image_id for rf in records]
        assert "img-0003" in store and "nope" not in store
        for rf in records:
            assert_stored(store, rf)
        assert store.verify() == []
        with pytest.raises(KeyError, match="nope"):
            store["nope"]


def test_documented_format_is_readable_without_our_code(tmp_path):
    """DATA_CONTRACTS.md: index columns, record = <f4 boxes | <f2 features | <f2 class_probs at `offset`."""
    records = [make_record(i) for i in range(4)]
    write_store(tmp_path, records, shard_bytes=1500)
    spec = json.loads((tmp_path / "spec.json").read_text())
    index = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert list(index[0]) == ["image_id", "shard", "offset", "nbytes", "num_boxes", "image_w", "image_h", "crc32"]
    for row, rf in zip(index, records, strict=True):
        r, d, c = row["num_boxes"], spec["feature_size"], spec["num_classes"]
        assert row["offset"] % 64 == 0 and row["nbytes"] == r * (16 + 2 * d + 2 * c)
        with open(tmp_path / "shards" / row["shard"], "rb") as f:
            f.seek(row["offset"])
            boxes = np.fromfile(f, "<f4", r * 4).reshape(r, 4)
            features = np.fromfile(f, "<f2", r * d).reshape(r, d)
            probs = np.fromfile(f, "<f2", r * c).reshape(r, c)
        assert np.array_equal(boxes, rf.boxes) and np.array_equal(features, rf.features.astype(np.float16))
        assert np.array_equal(probs, rf.class_probs.astype(np.float16))


def test_verify_finds_a_corrupted_record(tmp_path):
    write_store(tmp_path, [make_record(i) for i in range(5)])
    row = pq.read_table(tmp_path / "index.parquet").to_pylist()[3]
    with open(tmp_path / "shards" / row["shard"], "r+b") as f:
        f.seek(row["offset"] + 40)
        byte = f.read(1)
        f.seek(row["offset"] + 40)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert FeatureStore(tmp_path).verify() == [row["image_id"]]


def test_reader_rejects_inconsistent_files(tmp_path):
    write_store(tmp_path, [make_record(i) for i in range(3)])
    shard = next((tmp_path / "shards").glob("*.bin"))
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CorruptStoreError, match="shorter"):
        FeatureStore(tmp_path)
    (tmp_path / "spec.json").write_text(json.dumps(replace(SPEC, max_boxes=9).to_dict()))
    with pytest.raises(CorruptStoreError, match="another feature spec"):
        FeatureStore(tmp_path)


def test_writer_refuses_duplicates_other_specs_and_overwrites(tmp_path):
    with FeatureStoreWriter(tmp_path, SPEC) as writer:
        writer.add(make_record(0))
        with pytest.raises(DuplicateImageError):
            writer.add(make_record(0))
        with pytest.raises(InvalidRegionFeatures):
            writer.add(_broken("nan"))
        assert "img-0000" in writer and writer.added == 1
    with pytest.raises(FeatureSpecMismatch):
        FeatureStoreWriter(tmp_path, replace(SPEC, feature_size=32))
    with pytest.raises(FileExistsError, match="resume=True"):
        FeatureStoreWriter(tmp_path, SPEC, resume=False)
    with FeatureStoreWriter(tmp_path, SPEC) as writer:  # resume: the earlier image counts as stored
        assert "img-0000" in writer
        with pytest.raises(DuplicateImageError):
            writer.add(make_record(0))
    assert len(FeatureStore(tmp_path)) == 1


def test_one_writer_per_part(tmp_path):
    with FeatureStoreWriter(tmp_path, SPEC, part="rank0"):
        with pytest.raises(RuntimeError, match="another writer holds part 'rank0'"):
            FeatureStoreWriter(tmp_path, SPEC, part="rank0")
        FeatureStoreWriter(tmp_path, SPEC, part="rank1").close()


def _crash_after_flush(root: str, n_sealed: int, n_lost: int) -> None:
    writer = FeatureStoreWriter(root, SPEC)
    for i in range(n_sealed):
        writer.add(make_record(i))
    writer.flush()
    for i in range(n_sealed, n_sealed + n_lost):
        writer.add(make_record(i))
    writer._file.flush()  # the bytes reach the file, but the shard is never sealed
    os._exit(3)  # a crash: no close, no index publication


def test_crash_then_resume_redoes_only_the_unsealed_records(tmp_path):
    write_store(tmp_path, [make_record(i) for i in range(100, 103)])  # an earlier, complete run
    proc = multiprocessing.get_context("fork").Process(target=_crash_after_flush, args=(str(tmp_path), 4, 3))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    orphans = sorted(p.name for p in (tmp_path / "shards").glob("*.bin"))
    assert len(orphans) == 3  # the first run's shard, the sealed one, the unsealed one
    # Readers still see the last published index: the crash did not touch it.
    assert FeatureStore(tmp_path).image_ids() == [f"img-{i:04d}" for i in range(100, 103)]
    with FeatureStoreWriter(tmp_path, SPEC) as writer:
        assert all(f"img-{i:04d}" in writer for i in range(4))
        assert not any(f"img-{i:04d}" in writer for i in range(4, 7))
        assert len(list((tmp_path / "shards").glob("*.bin"))) == 2  # the unsealed shard was removed
        for i in range(4, 7):
            writer.add(make_record(i))
    store = FeatureStore(tmp_path)
    assert sorted(store.image_ids()) == sorted(f"img-{i:04d}" for i in [*range(7), *range(100, 103)])
    for i in [*range(7), *range(100, 103)]:
        assert_stored(store, make_record(i))
    assert store.verify() == []


def test_parts_merge_and_duplicates_across_parts(tmp_path):
    for rank in range(2):
        with FeatureStoreWriter(tmp_path, SPEC, part=f"rank{rank}", shard_bytes=1500) as writer:
            for i in range(rank, 12, 2):
                writer.add(make_record(i))
    assert not (tmp_path / "index.parquet").exists()  # named parts leave merging to the caller
    assert merge_index(tmp_path) == 12
    store = FeatureStore(tmp_path)
    assert sorted(store.image_ids()) == [f"img-{i:04d}" for i in range(12)]
    for i in range(12):
        assert_stored(store, make_record(i))
    with FeatureStoreWriter(tmp_path, SPEC, part="rank2") as writer:
        assert "img-0005" in writer  # a new part sees what other parts sealed
    # Two parts that did store the same image (e.g. a misconfigured launch) are caught at merge.
    other = tmp_path / "other"
    with FeatureStoreWriter(other, SPEC, part="a") as wa, FeatureStoreWriter(other, SPEC, part="b") as wb:
        wa.add(make_record(1))
        wb.add(make_record(1))
    with pytest.raises(DuplicateImageError, match="img-0001"):
        merge_index(other)


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore):
        self.store, self.ids = store, store.image_ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        rf = self.store[self.ids[i]]
        return self.ids[i], os.getpid(), torch.from_numpy(rf.features.astype(np.float32)).sum()


def test_dataloader_workers_and_pickling(tmp_path):
    records = [make_record(i) for i in range(12)]
    write_store(tmp_path, records, shard_bytes=2000)
    store = FeatureStore(tmp_path)
    store["img-0000"]  # the parent maps a shard before the fork: workers must not reuse it
    loader = torch.utils.data.DataLoader(_StoreDataset(store), batch_size=3, num_workers=2, shuffle=True)
    seen = {}
    pids = set()
    for ids, worker_pids, sums in loader:
        pids.update(worker_pids.tolist())
        seen.update(zip(ids, sums.tolist(), strict=True))
    assert os.getpid() not in pids and len(pids) == 2
    for rf in records:
        assert seen[rf.image_id] == pytest.approx(float(rf.features.astype(np.float16).astype(np.float32).sum()))
    clone = pickle.loads(pickle.dumps(store))  # what a spawn-started worker receives
    assert_stored(clone, records[5])


@pytest.fixture
def moto_s3(monkeypatch, tmp_path):
    """A real S3 API (moto server on loopback) reached through the standard AWS environment variables."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    from components import storage

    storage.s3_client().create_bucket(Bucket="features")
    yield storage
    server.stop()


def test_open_from_s3_syncs_to_a_local_cache(moto_s3, tmp_path, monkeypatch):
    records = [make_record(i) for i in range(6)]
    write_store(tmp_path / "local", records, shard_bytes=2000)
    moto_s3.sync_up(tmp_path / "local", "s3://features/stores/demo-v1")
    store = FeatureStore.open("s3://features/stores/demo-v1", cache_dir=tmp_path / "cache")
    assert store.root == tmp_path / "cache" and len(store) == 6
    for rf in records:
        assert_stored(store, rf)
    monkeypatch.setenv("VILBERT_CACHE_DIR", str(tmp_path / "default-cache"))
    again = FeatureStore.open("s3://features/stores/demo-v1")  # default: a per-URI folder under the cache dir
    assert again.root.is_relative_to(tmp_path / "default-cache") and again.image_ids() == store.image_ids()


def test_a_failed_write_never_seals_its_shard(tmp_path):
    writer = FeatureStoreWriter(tmp_path, SPEC, shard_bytes=400)  # three 2-box records (128 bytes each) per shard
    for i in range(5):
        writer.add(make_record(i, boxes=2))
    unsealed = set(writer._rows["image_id"])
    sealed = {f"img-{i:04d}" for i in range(5)} - unsealed
    assert len(sealed) == 3 and len(unsealed) == 2

    class DiskFull(OSError):
        pass

    def fail(data):
        raise DiskFull("no space left")

    writer._file.write = fail
    with pytest.raises(DiskFull):
        writer.add(make_record(6, boxes=2))
    with pytest.raises(RuntimeError, match="resume=True"):
        writer.add(make_record(7, boxes=2))
    writer.close()
    assert writer.added == 3 and not any(i in writer for i in unsealed)
    store = FeatureStore(tmp_path)
    assert set(store.image_ids()) == sealed  # the open shard's records are dropped, never half-published
    with FeatureStoreWriter(tmp_path, SPEC) as again:  # a resumed writer redoes exactly the dropped ones
        assert all(i in again for i in sealed) and not any(i in again for i in unsealed)


def test_regression_objective_does_not_constrain_the_class_count():
    import dataclasses

    from model.config import preset

    tiny = preset("tiny")
    vision = dataclasses.replace(tiny.vision, target_size=tiny.vision.feature_size)
    regression = tiny.replace(vision=vision, region_objective="regression")
    spec = FeatureSpec("demo", None, tiny.vision.feature_size, 7, 1, 36)
    spec.check_model(regression)  # C = 7 is irrelevant when regions regress features
    with pytest.raises(FeatureSpecMismatch, match="num_classes 7"):
        spec.check_model(tiny)
