"""Validate a dataset that lives in S3 and write the outputs to S3 (a real moto server on loopback)."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from components import storage
from components.steps.validate import ValidateConfig, ValidationFailed, run_validate
from components.validation import ValidationLimits, rejected_row_ids
from tests.components.steps.test_validate_fixtures import image_id, make_world


@pytest.mark.slow
def test_dataset_and_outputs_in_s3(tmp_path, s3_bucket) -> None:
    world = make_world(6, tasks=False)
    world.image_row(image_id(4))["sha256"] = "a" * 64
    local = world.write(tmp_path / "data")
    storage.sync_up(local, f"{s3_bucket}/data")
    out = f"{s3_bucket}/validated"
    config = ValidateConfig(
        dataset=f"{s3_bucket}/data",
        output=out,
        cache_dir=str(tmp_path / "cache"),
        limits=ValidationLimits(max_bad_fraction=0.5),
    )
    result = run_validate(config)
    assert result.passed and result.tables["manifest"].quarantined == 1
    report = json.loads(storage.read_bytes(f"{out}/validation_report.json"))
    assert report["dataset"] == f"{s3_bucket}/data" and report["tables"]["manifest"]["accepted"] == 5
    valid = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/manifest.valid.parquet")))
    assert image_id(4) not in valid.column("image_id").to_pylist() and valid.num_rows == 5
    assert storage.exists(f"{out}/data_docs/index.html") and storage.exists(f"{out}/summary.html")
    assert rejected_row_ids(out, "manifest") == {image_id(4)}
    assert rejected_row_ids(out, "captions") == {f"{image_id(4)}-c0", f"{image_id(4)}-c1"}

    # the same data under the default 5% limit fails, and the accepted tables of the earlier run are removed
    with pytest.raises(ValidationFailed, match="too many bad rows"):
        run_validate(ValidateConfig(dataset=config.dataset, output=out, cache_dir=config.cache_dir, data_docs=False))
    assert not storage.exists(f"{out}/manifest.valid.parquet") and not storage.exists(f"{out}/captions.valid.parquet")
    assert json.loads(storage.read_bytes(f"{out}/validation_report.json"))["passed"] is False
