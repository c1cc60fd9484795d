"""The DVC pipeline: dvc.yaml's structure, and (slow) the tiny pipeline end to end under real `dvc repro`, a
second `dvc repro` that does nothing, and a push / fresh-clone pull round trip through a local and an S3
remote (moto's server on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: Files dvc.yaml names as dependencies (copied into the test project).
CODE_DEPS = sorted({d for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
                    for d in (s.get("deps") or s.get("do", {}).get("deps", [])) if d.startswith("components/") or d == "model"})  # fmt: skip
TINY_PARAMS = {
    "data": {"source": "synthetic://shapes?seed=0&n=40&size=64"},
    "features": {"backend": "demo", "demo_epochs": 1, "demo_train_images": 20},
    "model": {"preset": "demo", "text_init": "minilm"},
    "pretrain": {
        "trainer": {"max_steps": 2, "batch_size": 4, "lr": 0.0002, "checkpoint_every": 5, "keep_checkpoints": False},
        "data": {"masked_pairs": "matched"},
    },
    "finetune": {
        "trainer": {"epochs": 1, "max_steps": 2, "batch_size": 4, "lr": 0.0001, "keep_checkpoints": False},
        "head_lr_mult": 30,
        "answer_min_count": 1,
    },
    "matrix": {"tasks": ["vqa", "refcoco+"], "seeds": [0]},
    "evaluate": {"split": "test", "batch_size": 16, "max_examples": 20},
    "register": {"seed": 0},
    "tracking": {"experiment": "vilbert-dvc-test"},
}


def test_stages_read_only_declared_params_and_cover_every_step() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages)[:4] == ["ingest", "validate", "features", "pretrain"]
    assert {"finetune-pretrained", "finetune-scratch", "finetune-blind", "evaluate", "evaluate-zero-shot", "table",
            "register"} <= set(stages)  # fmt: skip
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in stages.items():
        body = stage.get("do", stage)
        declared = [p if isinstance(p, str) else next(iter(p)) for p in body.get("params", [])]
        cmd = body["cmd"]
        for group, values in params.items():
            for key in values:
                used = f"${{{group}.{key}}}" in cmd
                if used:
                    assert group in declared or f"{group}.{key}" in declared, f"{name} reads {group}.{key}"
    config = (ROOT / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "remote = local" in config


def dvc(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


def make_project(base: Path) -> Path:
    """A git + DVC project with this repository's dvc.yaml, code dependencies and tiny params."""
    project = base / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copy(ROOT / ".dvcignore", project / ".dvcignore")
    for rel in CODE_DEPS:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, project / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / rel, project / rel)
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")  # as in this repository: data/ and runs/ are ignored
    git(project, "init", "-q")
    git(project, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", ".")
    git(project, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "project")
    return project


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_pipeline_under_dvc_repro_then_noop_then_remote_round_trip(tmp_path: Path, s3_env, s3_bucket) -> None:
    project = make_project(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_NO_ANALYTICS": "1"}  # fmt: skip
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # s3fs wants real (empty) files, not /dev/null
        (tmp_path / name).write_text("")
        env[name] = str(tmp_path / name)
    dvc(project, "repro", env=env)
    table = (project / "runs/table/table.md").read_text()
    assert "RefCOCO+" in table and "Zero-shot" in table and "Blind baseline" in table
    assert (project / "dvc.lock").exists()
    assert json.loads((project / "runs/register/refcoco+.json").read_text())["name"] == "vilbert-refcoco-plus"

    again = dvc(project, "repro", env=env)
    assert "Running stage" not in again.stdout, again.stdout
    status = dvc(project, "status", env=env)
    assert "up to date" in status.stdout.lower(), status.stdout

    # push to the default local remote and to S3; pull both into fresh clones
    git(project, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "dvc.lock")
    git(project, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "lock")
    dvc(project, "push", env=env)
    dvc(project, "remote", "add", "s3", f"{s3_bucket}/dvc", env=env)
    dvc(project, "remote", "modify", "s3", "endpointurl", os.environ["AWS_ENDPOINT_URL"], env=env)
    dvc(project, "push", "-r", "s3", env=env)
    for remote in ("local", "s3"):
        clone = tmp_path / f"clone-{remote}"
        subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
        shutil.copy(project / ".dvc" / "config", clone / ".dvc" / "config")  # the s3 remote was not committed
        if remote == "local":  # the default remote is a folder inside the project: point the clone at the original
            dvc(clone, "remote", "modify", "local", "url", str(project / ".dvc-remote"), env=env)
        dvc(clone, "pull", "-r", remote, env=env)
        for rel in ("data/features/spec.json", "runs/pretrain/final/model.safetensors",
                    "runs/finetune/refcoco+-pretrained-s0/final/config.json"):  # fmt: skip
            assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel
        assert "up to date" in dvc(clone, "status", env=env).stdout.lower()
