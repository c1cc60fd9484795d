"""Ingest with the source and the output on S3 (a real moto server on loopback)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components import storage
from components.steps.ingest import IngestConfig, run_ingest

FORMATS = Path(__file__).resolve().parents[2] / "data" / "formats"


def s3_table(uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def test_ingest_from_an_s3_folder_to_an_s3_dataset(s3_bucket, tmp_path):
    source = storage.join(s3_bucket, "raw", "folder_csv")
    storage.sync_up(FORMATS / "folder_csv", source)
    storage.write_bytes(storage.join(source, "images", "broken.jpg"), b"\xff\xd8 not really a jpeg")
    index = (FORMATS / "folder_csv" / "captions.csv").read_text() + "images/broken.jpg,a broken file,train\n"
    storage.write_bytes(storage.join(source, "captions.csv"), index.encode())
    out = storage.join(s3_bucket, "datasets", "v1")
    cfg = IngestConfig(source=source, output=out, progress=False, workers=4)

    first = run_ingest(cfg)
    assert (first.images.seen, first.images.stored, first.images.quarantined) == (4, 3, 1)
    assert first.images.reasons == {"unsupported_format": 1}
    manifest = s3_table(storage.join(out, "manifest.parquet"))
    assert [r["image_id"] for r in manifest] == ["images_bird", "images_cat", "images_dog"]
    for row in manifest:
        stored = storage.read_bytes(storage.join(out, row["path"]))
        assert hashlib.sha256(stored).hexdigest() == row["sha256"]
        assert row["source"] == source
    assert sorted(storage.list_files(out)) == sorted(
        ["annotations/captions.csv", "captions.parquet", "ingest_report.json", "manifest.parquet",
         "quarantine.parquet", *[r["path"] for r in manifest]]
    )  # fmt: skip
    quarantine = s3_table(storage.join(out, "quarantine.parquet"))
    assert {(r["table"], r["row_id"], r["reason"]) for r in quarantine} == {
        ("images", "images_broken", "unsupported_format"),
        ("captions", "images_broken-c0", "image_not_ingested"),
    }
    report = json.loads(storage.read_bytes(storage.join(out, "ingest_report.json")))
    assert report["reconciled"] and report["seen"] == 4 and report["captions"]["seen"] == 5

    etags = {i.path: i.etag for i in storage.list_file_info(storage.join(out, "images"))}
    again = run_ingest(cfg)
    assert (again.images.stored, again.images.skipped_unchanged, again.images.quarantined) == (0, 3, 1)
    assert {i.path: i.etag for i in storage.list_file_info(storage.join(out, "images"))} == etags


def test_ingest_local_source_to_s3_and_s3_source_to_local(s3_bucket, tmp_path):
    out = storage.join(s3_bucket, "coco-dataset")
    result = run_ingest(IngestConfig(source=str(FORMATS / "coco"), output=out, progress=False))
    assert result.images.stored == 5 and result.captions.stored == 10
    assert storage.exists(storage.join(out, "annotations", "captions_train2014.json"))
    # the same COCO files read from S3 into a local dataset give the same manifest (but for the source URI)
    src = storage.join(s3_bucket, "coco-raw")
    storage.sync_up(FORMATS / "coco", src)
    local = run_ingest(IngestConfig(source=src, output=str(tmp_path / "local"), progress=False))
    assert local.images.stored == 5
    assert pq.read_table(tmp_path / "local" / "manifest.parquet").to_pylist() == [
        row | {"source": src} for row in s3_table(storage.join(out, "manifest.parquet"))
    ]


def test_missing_output_bucket_is_a_clear_error(s3_env):
    cfg = IngestConfig(source=str(FORMATS / "folder_csv"), output="s3://no-such-bucket-here/ds", progress=False)
    with pytest.raises(storage.BucketNotFound, match="no-such-bucket-here"):
        run_ingest(cfg)
