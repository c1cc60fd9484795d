"""The features step: store + spec + report, resume, parallel parts, quarantine, S3, the CLI, imports."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from components import storage
from components.cli import app
from components.features import FeatureSpecMismatch, FeatureStore
from components.features.backends import BoxLimits, DemoBackend, DemoOptions, decode_rgb, open_extractor
from components.features.backends.base import PrepareContext
from components.steps.features import FeaturesConfig, FeaturesFailed, ImportOptions, run_features
from components.steps.ingest import IngestConfig, run_ingest

LIMITS = BoxLimits(min_boxes=2, max_boxes=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    """A small ingested synthetic dataset root (30 base images + distractors)."""
    root = tmp_path_factory.mktemp("world")
    run_ingest(IngestConfig(source="synthetic://shapes?seed=1&n=30&size=96", output=str(root), progress=False))
    return str(root)


@pytest.fixture(scope="module")
def demo_model(world, tmp_path_factory) -> str:
    """A briefly trained demo detector (quality is the demo backend's own test): tests pass it as model_dir."""
    work = tmp_path_factory.mktemp("demo")
    manifest = pd.read_parquet(Path(world) / "manifest.parquet")
    ctx = PrepareContext(world, manifest, str(work / "store"), work, LIMITS, log=lambda _m: None)
    DemoBackend(DemoOptions(train_images=24, epochs=1, eval_images=4)).prepare(ctx)
    return str(work / "store" / "demo_detector")


def config(world: str, output, demo_model: str, **kw) -> FeaturesConfig:
    base = FeaturesConfig(
        dataset=world, output=str(output), boxes=LIMITS, demo=DemoOptions(model_dir=demo_model), threads=1,
        progress=False, work_dir=None, batch_size=4,
    )  # fmt: skip
    return replace(base, **kw)


@pytest.fixture(scope="module")
def single(world, demo_model, tmp_path_factory):
    """One single-process run over the whole world: (result, store root)."""
    out = tmp_path_factory.mktemp("single") / "store"
    return run_features(config(world, out, demo_model), log=lambda _m: None), out


def test_features_step_writes_store_spec_and_report(world, single):
    result, out = single
    manifest = pd.read_parquet(Path(world) / "manifest.parquet")
    assert result.seen == len(manifest) == result.extracted == result.stored_total
    assert result.quarantined == 0 and result.skipped_existing == 0 and result.images_per_s > 0
    assert result.spec["backend"] == "demo" and result.spec["feature_size"] == 256 and result.spec["num_classes"] == 64
    assert (result.spec["min_boxes"], result.spec["max_boxes"]) == (2, 12)
    with FeatureStore.open(out) as store:
        assert sorted(store.image_ids()) == sorted(manifest["image_id"])
        assert store.verify() == []
        for row in manifest.itertuples():
            rf = store[row.image_id]
            assert 2 <= len(rf.boxes) <= 12 and (rf.image_w, rf.image_h) == (row.width, row.height)
            np.testing.assert_allclose(rf.class_probs.astype(np.float32).sum(axis=1), 1.0, atol=2e-2)
    report = json.loads((out / "features_report.json").read_text())
    assert report["extracted"] == result.extracted and report["config"]["backend"] == "demo"
    assert "box_recall_at_0_5" in report["backend_report"]  # measured when the detector was trained
    assert pd.read_parquet(out / "quarantine.parquet").empty


def test_the_stores_extractor_reproduces_its_features_for_a_new_image(world, single):
    result, out = single
    manifest = pd.read_parquet(Path(world) / "manifest.parquet")
    row = manifest.iloc[0]
    extractor = open_extractor(str(out))  # what serving uses for a user's image
    regions = extractor.extract([decode_rgb((Path(world) / row["path"]).read_bytes())])[0]
    with FeatureStore.open(out) as store:
        stored = store[row["image_id"]]
    np.testing.assert_allclose(regions.boxes, stored.boxes)
    np.testing.assert_allclose(regions.features, stored.features.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_resume_skips_images_already_stored(world, demo_model, single, tmp_path):
    out = tmp_path / "store"
    first = run_features(config(world, out, demo_model, limit=5), log=lambda _m: None)
    assert (first.seen, first.extracted) == (5, 5)
    with FeatureStore.open(out) as store:
        kept = {i: store[i].features.copy() for i in store.image_ids()}
    second = run_features(config(world, out, demo_model), log=lambda _m: None)
    assert second.skipped_existing == 5 and second.extracted == second.seen - 5
    assert second.stored_total == single[0].stored_total
    with FeatureStore.open(out) as store:
        for image_id, features in kept.items():
            np.testing.assert_array_equal(store[image_id].features, features)  # untouched, not redone
    third = run_features(config(world, out, demo_model), log=lambda _m: None)
    assert (third.extracted, third.skipped_existing) == (0, third.seen)


@pytest.mark.slow  # two spawned processes each import torch
def test_processes_write_parts_that_merge_into_one_store(world, demo_model, single, tmp_path):
    out = tmp_path / "store"
    result = run_features(config(world, out, demo_model, num_workers=2), log=lambda _m: None)
    assert result.processes == 2 and result.extracted == single[0].extracted
    parts = {p.name.split("-")[0] for p in (out / "shards").glob("*.idx.parquet")}
    assert len(parts) == 2
    with FeatureStore.open(out) as store, FeatureStore.open(single[1]) as reference:
        assert sorted(store.image_ids()) == sorted(reference.image_ids())
        for image_id in reference.image_ids()[:5]:
            np.testing.assert_array_equal(store[image_id].boxes, reference[image_id].boxes)
            np.testing.assert_allclose(
                store[image_id].features.astype(np.float32), reference[image_id].features.astype(np.float32), atol=1e-2
            )


def test_bad_images_are_quarantined_with_their_reason(world, demo_model, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(world, root)
    manifest = pd.read_parquet(root / "manifest.parquet").sort_values("image_id").reset_index(drop=True)
    paths = list(manifest["path"])
    data = (root / paths[0]).read_bytes()
    (root / paths[0]).write_bytes(data[: len(data) // 3])  # truncated
    (root / paths[1]).unlink()  # missing
    cmyk, grey = io.BytesIO(), io.BytesIO()  # unusual modes are converted, not rejected
    Image.open(root / paths[2]).convert("CMYK").save(cmyk, format="JPEG")
    Image.open(root / paths[3]).convert("L").save(grey, format="PNG")
    (root / "images" / "cmyk.jpg").write_bytes(cmyk.getvalue())
    (root / paths[3]).write_bytes(grey.getvalue())
    manifest.loc[2, "path"] = "images/cmyk.jpg"
    escape = manifest.iloc[[4]].assign(image_id="zz-escape", path="../outside.png")
    pd.concat([manifest, escape]).to_parquet(root / "manifest.parquet")

    out = tmp_path / "store"
    with pytest.raises(FeaturesFailed) as failed:  # 3 of ~40 images: over a 5% limit
        run_features(config(str(root), out, demo_model, max_quarantine_fraction=0.05), log=lambda _m: None)
    result = failed.value.result
    assert result.seen == len(manifest) + 1 == result.extracted + result.quarantined
    assert result.reasons == {"bad_path": 1, "decode_error": 1, "missing_file": 1}
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert dict(zip(quarantine["image_id"], quarantine["code"], strict=True)) == {
        manifest["image_id"][0]: "decode_error",
        manifest["image_id"][1]: "missing_file",
        "zz-escape": "bad_path",
    }
    assert all(r.startswith(("OSError", "UnidentifiedImageError", "no such", "path")) for r in quarantine["reason"])
    with FeatureStore.open(out) as store:
        assert manifest["image_id"][2] in store and manifest["image_id"][3] in store
        assert store[manifest["image_id"][2]].image_w == 96


def test_a_store_of_another_spec_or_without_resume_is_refused(world, demo_model, single, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(single[1], out)
    with pytest.raises(FeatureSpecMismatch, match="another output"):
        run_features(config(world, out, demo_model, boxes=BoxLimits(2, 20)), log=lambda _m: None)
    with pytest.raises(FileExistsError, match="already holds"):
        run_features(config(world, out, demo_model, resume=False), log=lambda _m: None)
    empty = run_features(config(world, tmp_path / "empty", demo_model, splits=("none",)), log=lambda _m: None)
    assert (empty.seen, empty.stored_total) == (0, 0)
    with FeatureStore.open(tmp_path / "empty") as store:  # a valid, empty store
        assert len(store) == 0 and store.spec.backend == "demo"


@pytest.mark.slow
def test_dataset_and_store_on_s3(world, demo_model, s3_bucket, tmp_path):
    dataset = storage.join(s3_bucket, "dataset")
    storage.sync_up(world, dataset)
    out = storage.join(s3_bucket, "features")
    first = run_features(config(dataset, out, demo_model, limit=6, work_dir=str(tmp_path / "w1")), log=lambda _m: None)
    assert first.extracted == 6 and first.report_path == f"{out}/features_report.json"
    second = run_features(config(dataset, out, demo_model, work_dir=str(tmp_path / "w2")), log=lambda _m: None)
    assert second.skipped_existing == 6 and second.extracted == second.seen - 6
    with FeatureStore.open(out, cache_dir=tmp_path / "cache") as store:
        assert len(store) == second.seen and store.verify() == []
    assert json.loads(storage.read_bytes(f"{out}/features_report.json"))["extracted"] == second.extracted


def test_cli_runs_the_step_and_prints_the_counts(world, demo_model, tmp_path):
    out = tmp_path / "store"
    args = ["features", "--dataset", world, "--output", str(out), "--demo-model", demo_model, "--limit", "3"]
    res = CliRunner().invoke(app, [*args, "--min-boxes", "2", "--max-boxes", "12", "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert '"extracted": 3' in res.output and (out / "spec.json").exists()
    res = CliRunner().invoke(app, ["features", "--output", str(out), "--backend", "import"])
    assert res.exit_code == 1 and "--import-format" in res.output


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode()


def test_import_backend_goes_through_the_same_step(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        probs = rng.random((4, 5))
        fields = [f"img{i}", "40", "30", "4", b64(np.tile([1, 2, 20, 25], (4, 1))), b64(rng.random((4, 8)))]
        lines.append("\t".join([*fields, b64(probs / probs.sum(1, keepdims=True))]))
    lines.append("img9\t40\t30\t1\tnot-base64\tnope\tnope")
    (tmp_path / "features.tsv").write_text("\n".join(lines) + "\n")
    cfg = FeaturesConfig(
        dataset="", output=str(tmp_path / "store"), backend="import", boxes=BoxLimits(1, 10),
        imports=ImportOptions("tsv", (str(tmp_path / "features.tsv"),), feature_size=8, num_classes=5),
        max_quarantine_fraction=0.5,
    )  # fmt: skip
    result = run_features(cfg)
    assert (result.seen, result.extracted, result.quarantined, result.stored_total) == (4, 3, 1, 3)
    assert result.spec["backend"] == "import:tsv"
    with pytest.raises(ValueError, match="only for, import"):
        FeaturesConfig(dataset="x", output="y", backend="demo", imports=cfg.imports)


TORCHRUN_SCRIPT = """
import os
import sys
from pathlib import Path
from components.features.backends import BoxLimits, DemoOptions
from components.steps.features import FeaturesConfig, run_features
dataset, output, model = sys.argv[1:4]
cfg = FeaturesConfig(dataset=dataset, output=output, boxes=BoxLimits(2, 12), demo=DemoOptions(model_dir=model),
                     threads=1, progress=False)
result = run_features(cfg)
fields = (result.seen, result.extracted, result.stored_total, result.processes)
Path(output).with_name(f"result-{os.environ['RANK']}.txt").write_text(" ".join(map(str, fields)))
"""


@pytest.mark.slow  # two torchrun ranks each import torch
def test_torchrun_ranks_split_the_images_and_rank_zero_merges(world, demo_model, single, tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "store"
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run([*cmd, world, str(out), demo_model], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = single[0].seen
    for rank in (0, 1):  # every rank returns the merged result
        assert (tmp_path / f"result-{rank}.txt").read_text() == f"{n} {n} {n} 2"
    parts = {p.name.split("-")[0] for p in (out / "shards").glob("*.idx.parquet")}
    assert {p.rsplit("_", 2)[1] for p in parts} == {"r0", "r1"}
    with FeatureStore.open(out) as store:
        assert len(store) == n and store.verify() == []
