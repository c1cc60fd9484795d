"""Row-level validation, bad input first: every kind of bad row ends up quarantined with the right reason,
nothing is lost (original fields kept), and counts reconcile; then a clean dataset passes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.steps.validate import ValidateConfig, ValidateResult, run_validate
from components.validation import ValidationLimits, rejected_row_ids
from tests.components.steps.test_validate_fixtures import H, W, image_id, make_world, png_bytes

# (table, row_id) -> the exact reasons expected for that row
EXPECTED: dict[tuple[str, str], list[str]] = {}


def _break(world) -> dict[tuple[str, str], list[str]]:
    """Inject one bad row of every kind into a clean world; return what each row's reasons must be."""
    exp: dict[tuple[str, str], list[str]] = {}
    # --- manifest
    del world.files[world.image_row(image_id(1))["path"]]
    exp["manifest", image_id(1)] = ["missing_file"]
    world.image_row(image_id(2))["sha256"] = "0" * 64
    exp["manifest", image_id(2)] = ["sha256_mismatch"]
    bad = png_bytes(3)[:60]  # truncated: a PNG header, no pixels
    world.files[world.image_row(image_id(3))["path"]] = bad
    import hashlib

    world.image_row(image_id(3))["sha256"] = hashlib.sha256(bad).hexdigest()
    exp["manifest", image_id(3)] = ["undecodable_image"]
    world.manifest.append(dict(world.image_row(image_id(5))))  # same id twice (same split: no leakage)
    exp["manifest", image_id(5)] = ["duplicate_image_id"]
    world.image_row(image_id(6))["width"] = W + 2
    exp["manifest", image_id(6)] = ["size_mismatch"]
    world.image_row(image_id(7))["path"] = "../outside.png"
    exp["manifest", image_id(7)] = ["unsafe_path"]
    world.image_row(image_id(8))["split"] = "holdout"
    exp["manifest", image_id(8)] = ["unknown_split"]
    tiny = png_bytes(99, size=(4, H))
    world.files["images/tiny.png"] = tiny
    world.manifest.append(
        {**world.image_row(image_id(0)), "image_id": "tiny", "path": "images/tiny.png", "width": 4}
        | {"sha256": hashlib.sha256(tiny).hexdigest()}
    )
    exp["manifest", "tiny"] = ["width_out_of_range"]
    # --- captions (image 0 and 10+ are good images)
    caps = {c["caption_id"]: c for c in world.captions}
    caps[f"{image_id(0)}-c0"]["caption"] = ""
    exp["captions", f"{image_id(0)}-c0"] = ["caption_too_short"]
    caps[f"{image_id(0)}-c1"]["caption"] = "   "
    exp["captions", f"{image_id(0)}-c1"] = ["caption_too_short"]
    caps[f"{image_id(10)}-c0"]["caption"] = "x" * 1001
    exp["captions", f"{image_id(10)}-c0"] = ["caption_too_long"]
    world.captions.append({**caps[f"{image_id(11)}-c0"], "caption": "a copy with the same id"})
    exp["captions", f"{image_id(11)}-c0"] = ["duplicate_caption_id"]
    world.captions.append({**caps[f"{image_id(11)}-c1"], "caption_id": "ghost", "image_id": "syn-nope"})
    exp["captions", "ghost"] = ["unknown_image"]
    exp["captions", f"{image_id(2)}-c0"] = ["image_quarantined"]  # its image has a bad sha256
    # --- COCO ground truth: annotation ids are image * 100 + k + 1
    gt = {a["id"]: a for a in world.json_files["annotations/instances.json"]["annotations"]}
    gt[1001]["bbox"] = [40.0, 30.0, 20.0, 20.0]
    exp["coco_instances", "1001"] = ["box_outside_image"]
    gt[1002]["bbox"] = [1.0, 2.0, 0.0, 5.0]
    exp["coco_instances", "1002"] = ["bad_bbox"]
    gt[1101]["category_id"] = 99
    exp["coco_instances", "1101"] = ["unknown_category"]
    # --- RefCOCO+ instances and refs
    inst = {a["id"]: a for a in world.ref_instances}
    inst[1201]["bbox"] = [0.0, 0.0, W + 5.0, 10.0]
    exp["refcoco+_instances", "1201"] = ["box_outside_image"]
    refs = {r["ref_id"]: r for r in world.refs}
    exp["refcoco+_refs", "12"] = ["annotation_quarantined"]
    refs[13]["ann_id"] = 777777
    exp["refcoco+_refs", "13"] = ["unknown_annotation"]
    refs[14]["sentences"] = []
    exp["refcoco+_refs", "14"] = ["no_sentences"]
    refs[15]["sentences"][0]["raw"] = "y" * 2000
    exp["refcoco+_refs", "15"] = ["expression_too_long"]
    refs[16]["ann_id"] = 1701  # an annotation of image 17
    exp["refcoco+_refs", "16"] = ["image_mismatch"]
    # --- VQA (train2014 holds the train-split images: 0, 1, 2, 5, 6, 7, 10, 11, 12, 15, 16, 17)
    qs = {q["question_id"]: q for q in world.vqa_questions}
    anns = {a["question_id"]: a for a in world.vqa_annotations}
    qs[100]["question"] = ""
    exp["vqa_questions", "100"] = ["question_too_short"]
    exp["vqa_annotations", "100"] = ["question_quarantined"]
    qs[110]["image_id"] = 999
    anns[110]["image_id"] = 999
    exp["vqa_questions", "110"] = ["unknown_image"]
    exp["vqa_annotations", "110"] = ["question_quarantined"]
    anns[120]["answers"] = []
    exp["vqa_annotations", "120"] = ["no_answers"]
    world.vqa_annotations.remove(anns[150])
    exp["vqa_questions", "150"] = ["missing_annotation"]
    world.vqa_annotations.append({**anns[160], "question_id": 4242})
    exp["vqa_annotations", "4242"] = ["unknown_question"]
    # --- Flickr30k
    fl = {e["imgid"]: e for e in world.flickr}
    fl[10]["filename"] = "nowhere.jpg"
    exp["flickr30k", "10"] = ["unknown_image"]
    fl[11]["sentences"] = []
    exp["flickr30k", "11"] = ["no_sentences"]
    # --- VCR (train.jsonl lines are in image order: 0, 1, 2, 5, 6, 7, 10, 11, 12, 15, ...)
    vcr = {x["annot_id"]: x for x in world.vcr_train}
    vcr["train-10"]["answer_choices"] = vcr["train-10"]["answer_choices"][:3]
    exp["vcr", "train-10"] = ["bad_answer_choices"]
    vcr["train-11"]["answer_label"] = 7
    exp["vcr", "train-11"] = ["bad_answer_label"]
    vcr["train-12"]["question"] = ["Why", "is", [5], "here", "?"]
    exp["vcr", "train-12"] = ["bad_object_ref"]
    vcr["train-15"]["question"] = []
    exp["vcr", "train-15"] = ["empty_question"]
    world.vcr_train.append('{"annot_id": "broken", ')
    exp["vcr", f"train.jsonl:{len(world.vcr_train)}"] = ["invalid_json"]
    return exp


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory) -> tuple[ValidateResult, dict, Path]:
    world = make_world(20)
    expected = _break(world)
    root = world.write(tmp_path_factory.mktemp("broken"))
    # a symbolic link that leads out of the dataset root (same bytes, so only the link is wrong)
    linked = root / world.image_row(image_id(9))["path"]
    outside = tmp_path_factory.mktemp("elsewhere") / "syn-000009.png"
    outside.write_bytes(linked.read_bytes())
    linked.unlink()
    linked.symlink_to(outside)
    expected["manifest", image_id(9)] = ["unsafe_path"]
    out = tmp_path_factory.mktemp("broken_out")
    # Bad rows are the point here: allow any fraction, so the step passes and writes the accepted tables.
    limits = ValidationLimits(max_bad_fraction=1.0)
    result = run_validate(ValidateConfig(dataset=str(root), output=str(out), limits=limits, data_docs=False))
    return result, expected, out


def _quarantine(out: Path) -> dict[tuple[str, str], dict]:
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    return {(r["table"], r["row_id"]): r for r in rows}


def test_every_kind_of_bad_row_is_quarantined_with_its_reasons(broken_run) -> None:
    _, expected, out = broken_run
    quarantine = _quarantine(out)
    wrong = {
        k: (quarantine.get(k, {}).get("reasons"), v)
        for k, v in expected.items()
        if quarantine.get(k, {}).get("reasons") != v
    }
    assert not wrong, f"(table, row) -> (got, expected): {wrong}"
    # and nothing else was rejected: the injected rows (plus the duplicate's second copy and rows whose image or
    # question was rejected) are the whole quarantine
    unexpected = {k: r["reasons"] for k, r in quarantine.items() if k not in expected}
    cascades = {"image_quarantined", "question_quarantined", "annotation_quarantined"}
    assert all(set(reasons) <= cascades for reasons in unexpected.values()), unexpected


def test_quarantine_keeps_every_reason_and_the_original_row(broken_run) -> None:
    _, _, out = broken_run
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    dup = [r for r in rows if r["table"] == "manifest" and r["row_id"] == image_id(5)]
    assert len(dup) == 2 and {r["row_index"] for r in dup} == {5, 20}  # both copies, told apart by position
    record = json.loads(next(r for r in rows if r["row_id"] == image_id(2))["record"])
    assert record["sha256"] == "0" * 64 and record["width"] == W and record["path"] == f"images/{image_id(2)}.png"
    bad_json = next(r for r in rows if r["table"] == "vcr" and r["reasons"] == ["invalid_json"])
    assert json.loads(bad_json["record"])["text"] == '{"annot_id": "broken", '
    for r in rows:
        assert r["reason"] == "; ".join(r["reasons"]) and r["reasons"]


def test_counts_reconcile_everywhere(broken_run) -> None:
    result, _, out = broken_run
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    report = json.loads((out / "validation_report.json").read_text())
    assert report["passed"] is True and set(report["tables"]) == set(result.tables)
    for name, c in result.tables.items():
        assert c.input_rows == c.accepted + c.quarantined, name
        assert c.quarantined == sum(r["table"] == name for r in rows), name
        assert report["tables"][name]["quarantined"] == c.quarantined
    assert result.tables["manifest"].input_rows == 22  # 20 images + the duplicate + the tiny one
    manifest_ok = pq.read_table(out / "manifest.valid.parquet")
    assert manifest_ok.num_rows == result.tables["manifest"].accepted
    assert manifest_ok.schema == pq.read_schema(Path(result.report["dataset"]) / "manifest.parquet")
    assert image_id(2) not in manifest_ok.column("image_id").to_pylist()
    captions_ok = pq.read_table(out / "captions.valid.parquet")
    assert captions_ok.num_rows == result.tables["captions"].accepted
    rejected_images = (1, 2, 3, 5, 6, 7, 8, 9)  # every question on them goes too
    assert rejected_row_ids(out, "vqa_questions") == {"100", "110", "150"} | {str(10 * i) for i in rejected_images}


def test_summary_is_readable_offline(broken_run) -> None:
    _, _, out = broken_run
    md = (out / "summary.md").read_text()
    assert "# Data validation: PASSED" in md and "`sha256_mismatch`" in md and "the file's sha256 differs" in md
    page = (out / "summary.html").read_text()
    assert "<style>" in page and "http" not in page  # one file, nothing loaded from a CDN
    results = json.loads((out / "gx_results.json").read_text())
    manifest = results["results"]["manifest"]
    failed = {r["expectation_config"]["meta"]["reason"] for r in manifest["results"] if not r["success"]}
    assert {"missing_file", "sha256_mismatch", "undecodable_image", "duplicate_image_id"} <= failed


@pytest.mark.slow
def test_clean_dataset_passes_with_data_docs(tmp_path, monkeypatch) -> None:
    world = make_world(10)
    root = world.write(tmp_path / "data")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them (GX wants absolute ones internally)
    result = run_validate(ValidateConfig(dataset="data", output="out"))
    assert result.passed and not result.failures and result.quarantined == 0
    assert set(result.tables) == {
        "manifest",
        "captions",
        "coco_instances",
        "vqa_questions",
        "vqa_annotations",
        "refcoco+_instances",
        "refcoco+_refs",
        "flickr30k",
        "vcr",
    }
    assert result.tables["captions"].accepted == 20 and result.tables["flickr30k"].accepted == 10
    assert pq.read_table(out / "quarantine.parquet").num_rows == 0
    assert pq.read_table(out / "manifest.valid.parquet").equals(pq.read_table(root / "manifest.parquet"))
    docs = out / "data_docs"
    assert (docs / "index.html").is_file() and (docs / "expectations" / "manifest.html").is_file()
    assert len(list((docs / "validations").rglob("*.html"))) == len(result.tables)
    assert not list(out.glob(".data_docs.tmp*"))
    results = json.loads((out / "gx_results.json").read_text())["results"]
    assert all(r["success"] for r in results.values())
