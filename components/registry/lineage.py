"""Lineage tags of a registered version: the code, the data and features, the runs, the evaluation metrics.

The tag names are listed in the docstring of :mod:`components.steps.register`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components import storage

if TYPE_CHECKING:
    from components.steps.register import RegisterConfig


def dvc_lineage(lock: Path, paths: Mapping[str, str | None]) -> dict[str, str]:
    """``lineage.dvc.<role>``: the md5 (and ``..._out``: stage and path) of the dvc.lock out that holds each local
    path (the out itself or the nearest folder above it).  Unreadable locks and unmatched paths give no tags."""
    import yaml

    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    outs = []
    for stage, body in (data.get("stages") or {}).items():
        for out in (body or {}).get("outs") or []:
            digest = isinstance(out, dict) and (out.get("md5") or out.get("etag") or out.get("checksum"))
            if digest and out.get("path"):
                outs.append((stage, (lock.parent / str(out["path"])).resolve(), str(digest)))
    tags = {}
    for role, path in paths.items():
        if not path or storage.is_s3(path):
            continue
        target = Path(path).resolve()
        holding = [o for o in outs if o[1] == target or o[1] in target.parents]
        if holding:
            stage, out_path, digest = max(holding, key=lambda o: len(o[1].parts))
            tags[f"lineage.dvc.{role}"] = digest
            tags[f"lineage.dvc.{role}_out"] = f"{stage}:{os.path.relpath(out_path, lock.parent)}"
    return tags


def eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``eval.<name>`` = value of every number in metrics.json ``metrics``, named as MLflow allows (``recall@1`` ->
    ``eval.recall_at_1``)."""
    from components.evaluation.scoring import mlflow_metric_name

    values = (metrics.get("metrics") or {}).items()
    return {f"eval.{mlflow_metric_name(k)}": float(v) for k, v in values if isinstance(v, int | float)}


def code_lineage() -> dict[str, str]:
    """The git commit of the bundled code and whether its packages had uncommitted changes."""
    import subprocess

    from components.tracking import git_commit

    repo = Path(__file__).resolve().parents[2]  # (components.__file__ is None when it resolves as a namespace)
    commit = git_commit(repo)
    if commit is None:
        return {}
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", "components", "model"], cwd=repo,
                                capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"lineage.git_commit": commit}
    return {"lineage.git_commit": commit, "lineage.code_dirty": str(bool(status.strip())).lower()}


def version_tags(config: RegisterConfig, step: Mapping[str, Any], metrics: Mapping[str, Any], checkpoint: Path,
                  spec_hash: str, pipeline_run: str | None, run_id: str) -> dict[str, str]:  # fmt: skip
    from components.features.backends.base import sha256_file
    from components.tracking import project_root
    from model.checkpoint import WEIGHTS_FILE

    tags = {
        "task": metrics["task"],
        "metric.name": str(metrics["metric"]),
        "metric.value": repr(float(metrics["value"])),
        "eval.split": str(metrics.get("split")),
        "eval.num_examples": str(metrics.get("num_examples")),
        "eval.zero_shot": str(bool(metrics.get("zero_shot"))).lower(),
        **{k: repr(v) for k, v in eval_metrics(metrics).items()},
        "model.preset": str(step.get("preset")),
        "model.init": str(step.get("init")),
        "model.seed": str(step.get("seed")),
        "lineage.model_dir": str(Path(config.model).resolve()),
        "lineage.evaluation_dir": config.evaluation,
        "lineage.features": str(config.features or step.get("features")),
        "lineage.dataset": str(step.get("dataset")),
        "lineage.data_hash": str(step.get("data_hash")),
        "lineage.feature_spec_hash": spec_hash,
        "lineage.checkpoint_hash": sha256_file(checkpoint / WEIGHTS_FILE),
        "lineage.finetune_run_id": str(step.get("tracking_run_id")),
        "lineage.evaluation_run_id": str(metrics.get("tracking_run_id")),
        "lineage.pipeline_run_id": str(pipeline_run),
        "lineage.register_run_id": run_id,
        **code_lineage(),
    }
    lock = Path(config.dvc_lock) if config.dvc_lock else project_root() / "dvc.lock"
    if lock.is_file():
        roles = {"dataset": step.get("dataset"), "features": config.features or step.get("features"),
                 "model": config.model, "evaluation": config.evaluation}  # fmt: skip
        tags.update(dvc_lineage(lock, roles))
    return tags
