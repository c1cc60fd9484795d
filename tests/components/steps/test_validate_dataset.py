"""Dataset-level failures stop the step with a readable summary, and the reports are still written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from components.steps.validate import ValidateConfig, ValidationFailed, run_validate
from components.validation import ValidationLimits
from tests.components.steps.test_validate_fixtures import MANIFEST_SCHEMA, image_id, make_world, png_bytes


def _fail(root: Path, out: Path, **kwargs) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        run_validate(ValidateConfig(dataset=str(root), output=str(out), data_docs=False, **kwargs))
    return info.value


def _assert_reports_written(out: Path, passed: bool = False) -> dict:
    report = json.loads((out / "validation_report.json").read_text())
    assert report["passed"] is passed
    for name in ("quarantine.parquet", "gx_results.json", "summary.md", "summary.html"):
        assert (out / name).is_file(), name
    # a failed run leaves no accepted table that a later step could take for validated data
    assert passed == (out / "manifest.valid.parquet").exists() == (out / "captions.valid.parquet").exists()
    return report


def test_schema_mismatch_fails_with_a_readable_summary(tmp_path) -> None:
    world = make_world(6, tasks=False)
    # wrong type (width int64), a missing column (source), an extra column (note)
    world.manifest_schema = pa.schema(
        [f.with_type(pa.int64()) if f.name == "width" else f for f in MANIFEST_SCHEMA if f.name != "source"]
        + [pa.field("note", pa.string())]
    )
    for row in world.manifest:
        row["note"] = "hello"
    root = world.write(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.valid.parquet").write_bytes(b"stale output of an earlier run")
    exc = _fail(root, out, tasks=False)
    text = str(exc)
    assert "manifest: schema mismatch: missing columns ['source']; unexpected columns ['note']" in text
    assert "manifest: schema mismatch: column 'width' should be int32, got int64" in text
    assert exc.result.failures == [line.strip()[2:] for line in text.splitlines()[1:-1]]
    assert "## Why it failed" in exc.summary and "schema mismatch" in exc.summary
    _assert_reports_written(out)
    # the rows themselves are fine: a schema failure is not blamed on them
    assert exc.result.tables["manifest"].quarantined == 0


def test_too_many_bad_rows_fail_the_table(tmp_path) -> None:
    world = make_world(10, tasks=False)
    world.image_row(image_id(3))["sha256"] = "f" * 64  # 1 of 10 = 10% > 5%
    root = world.write(tmp_path / "data")
    exc = _fail(root, tmp_path / "out", tasks=False)
    assert exc.result.failures[0] == ("manifest: too many bad rows: 1 of 10 (10.0%) quarantined, the limit is 5.0%")
    report = _assert_reports_written(tmp_path / "out")
    assert report["tables"]["manifest"]["reasons"] == {"sha256_mismatch": 1}


@pytest.mark.slow
def test_split_leakage_fails_the_step_and_quarantines_the_rows(tmp_path) -> None:
    world = make_world(20)
    # manifest: one image id under two splits, and identical bytes stored under two ids in two splits
    world.manifest.append({**world.image_row(image_id(0)), "split": "val"})
    copy = world.image_row(image_id(3))  # val
    world.files["images/copy.png"] = world.files[copy["path"]]
    world.manifest.append({**copy, "image_id": "copy", "path": "images/copy.png", "split": "train"})
    # captions: a caption labelled with another split than its image's
    next(c for c in world.captions if c["image_id"] == image_id(1))["split"] = "test"
    # tasks: an image asked about in two VQA splits, referred to in two RefCOCO+ splits, listed twice in Flickr30k
    world.json_files["tasks/vqa/v2_OpenEnded_mscoco_val2014_questions.json"]["questions"].append(
        {"image_id": 2, "question": "Is it red?", "question_id": 9999}
    )
    world.json_files["tasks/vqa/v2_mscoco_val2014_annotations.json"]["annotations"].append(
        {"question_id": 9999, "image_id": 2, "multiple_choice_answer": "no", "answers": [{"answer": "no"}]}
    )
    world.refs.append({**world.refs[5], "ref_id": 555, "split": "testA"})
    world.flickr.append({**world.flickr[6], "imgid": 666, "split": "test"})
    world.jsonl_files["tasks/vcr/val.jsonl"].append({**world.vcr_train[0], "annot_id": "val-leak"})
    root = world.write(tmp_path / "data")
    exc = _fail(root, tmp_path / "out", limits=ValidationLimits(max_bad_fraction=1.0))
    failures = "\n".join(exc.result.failures)
    for expected in (
        "manifest: split_leakage: 2 row(s)",
        "manifest: content_split_leakage: 4 row(s)",  # the id leak is a content leak too
        "captions: split_mismatch: 1 row(s)",
        "vqa_questions: split_leakage: 2 row(s)",
        "refcoco+_refs: split_leakage: 2 row(s)",
        "flickr30k: split_leakage: 2 row(s)",
        "vcr: split_leakage: 2 row(s)",
    ):
        assert expected in failures, (expected, failures)
    assert len(exc.result.failures) == 7
    rows = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    leaks = {(r["table"], r["row_id"]) for r in rows if {"split_leakage", "content_split_leakage"} & set(r["reasons"])}
    assert leaks == {
        ("manifest", image_id(0)),
        ("manifest", image_id(3)),
        ("manifest", "copy"),
        ("vqa_questions", "20"),
        ("vqa_questions", "9999"),
        ("refcoco+_refs", "5"),
        ("refcoco+_refs", "555"),
        ("flickr30k", "6"),
        ("flickr30k", "666"),
        ("vcr", "train-0"),
        ("vcr", "val-leak"),
    }
    assert "split_leakage" in exc.summary and "Why it failed" in (tmp_path / "out" / "summary.md").read_text()


def test_unreadable_files_are_dataset_failures(tmp_path) -> None:
    world = make_world(5, tasks=False)
    root = world.write(tmp_path / "data")
    (root / "tasks" / "flickr30k").mkdir(parents=True)
    (root / "tasks" / "flickr30k" / "dataset_flickr30k.json").write_text('{"images": [')
    (root / "captions.parquet").write_bytes(b"PAR1 not really")
    exc = _fail(root, tmp_path / "out")
    assert exc.result.failures[0].startswith("captions: captions.parquet unreadable")
    assert exc.result.failures[1].startswith("flickr30k: dataset_flickr30k.json unreadable")
    assert exc.result.tables["manifest"].accepted == 5

    (root / "manifest.parquet").unlink()
    exc = _fail(root, tmp_path / "out2", tasks=False)
    assert exc.result.failures[0] == "manifest: manifest.parquet not found"


def test_config_and_limits_are_checked_when_built(tmp_path) -> None:
    with pytest.raises(ValueError, match="min_regions"):
        ValidationLimits(min_regions=40)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        ValidationLimits(max_bad_fraction=1.5)
    with pytest.raises(ValueError, match="text"):
        ValidationLimits(min_text_chars=5, max_text_chars=4)
    with pytest.raises(ValueError, match="workers"):
        ValidateConfig(dataset="a", output="b", workers=0)
    with pytest.raises(ValueError, match="dataset root itself"):
        ValidateConfig(dataset=str(tmp_path), output=str(tmp_path))


def test_cli_exit_codes_and_output(tmp_path) -> None:
    from components.cli import app

    world = make_world(4, tasks=False)
    good = world.write(tmp_path / "good")
    result = CliRunner().invoke(
        app, ["validate", "--dataset", str(good), "--output", str(tmp_path / "o1"), "--no-data-docs"]
    )
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output and (tmp_path / "o1" / "manifest.valid.parquet").is_file()

    bad = png_bytes(1)[:50]
    world.files[world.image_row(image_id(1))["path"]] = bad
    world.image_row(image_id(1))["sha256"] = hashlib.sha256(bad).hexdigest()
    broken = world.write(tmp_path / "bad")
    args = ["validate", "--dataset", str(broken), "--output", str(tmp_path / "o2"), "--no-data-docs", "--no-tasks"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "too many bad rows: 1 of 4 (25.0%)" in result.output and "summary.md" in result.output
    result = CliRunner().invoke(app, [*args, "--min-regions", "0"])
    assert result.exit_code == 2 and "min_regions" in result.output
