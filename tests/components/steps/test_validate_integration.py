"""Validate what the real ingest step writes from the synthetic world (skipped only if those modules are missing)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from components.steps.ingest import IngestConfig, run_ingest
from components.steps.validate import ValidateConfig, run_validate
from components.validation import ValidationLimits


@pytest.mark.slow
def test_ingested_synthetic_world_passes_then_catches_a_changed_file(tmp_path) -> None:
    root = tmp_path / "data"
    ingested = run_ingest(
        IngestConfig(source="synthetic://shapes?seed=0&n=20&size=64", output=str(root), progress=False)
    )
    out = tmp_path / "out"
    result = run_validate(ValidateConfig(dataset=str(root), output=str(out), data_docs=False))
    assert result.passed and result.quarantined == 0
    assert result.tables["manifest"].input_rows == ingested.images.stored
    assert result.tables["captions"].input_rows == ingested.captions.stored
    for table in ("coco_instances", "vqa_questions", "vqa_annotations", "refcoco+_refs", "flickr30k", "vcr"):
        assert result.tables[table].input_rows > 0, table

    # change one stored image after ingest: validation catches it and drops what depends on it
    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    victim = manifest[0]
    (root / victim["path"]).write_bytes((root / manifest[1]["path"]).read_bytes())
    limits = ValidationLimits(max_bad_fraction=1.0)
    again = run_validate(ValidateConfig(dataset=str(root), output=str(out), data_docs=False, limits=limits))
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [r["reasons"] for r in rows if r["table"] == "manifest"] == [["sha256_mismatch"]]
    assert {r["row_id"] for r in rows if r["table"] == "manifest"} == {victim["image_id"]}
    dependent = {r["table"] for r in rows if r["reasons"] == ["image_quarantined"]}
    assert {"captions", "vqa_questions", "flickr30k"} <= dependent
    report = json.loads((out / "validation_report.json").read_text())
    assert report["totals"]["quarantined"] == len(rows) == again.quarantined
