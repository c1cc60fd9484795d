"""What the pipeline's pretrain step does with its launcher setting, and small artifact helpers.

* ``local``: ``run_pretrain`` inside the step (torchrun's elastic agent when ``nproc`` > 1).
* ``pytorchjob``: the step creates a Training Operator PyTorchJob running ``vilbert pretrain`` on
  ``nodes`` x ``gpus_per_node`` workers (components/kube/pytorchjob.py), follows it to the end, and copies the
  result from the shared checkpoints volume into the step's output artifact.  The job reads the step's inputs
  from object storage (their artifact URIs), so nothing large passes through the step pod.
"""

from __future__ import annotations

import html
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

#: Where the PyTorchJob writes (the vilbert-checkpoints PVC, mounted by the job and by the pretrain step).
SHARED_CHECKPOINTS = "/data/checkpoints"
PUBLISHED = ("final", "step.json", "result.json")


def _step_layer(paths: dict[str, str], output: str, experiment: str) -> dict[str, Any]:
    """What the pipeline itself decides for a training step: its input and output paths, no progress bar, and
    the pipeline's MLflow experiment (over the settings' own)."""
    return {**paths, "trainer": {"output_dir": output, "progress": False}, "tracking": {"experiment": experiment}}


def pretrain_config(settings: dict[str, Any], paths: dict[str, str], output: str, experiment: str) -> Any:
    """The step's PretrainConfig: ``settings`` (PretrainConfig fields) under the pipeline's paths."""
    from components.config import load
    from components.steps.pretrain import PretrainConfig

    return load(PretrainConfig, settings, _step_layer(paths, output, experiment))


def finetune_config(settings: dict[str, Any], paths: dict[str, str], task: str, init: str, blind: bool, output: str,
                    experiment: str) -> Any:  # fmt: skip
    """The step's FinetuneConfig: ``settings`` (FinetuneConfig fields) under the pipeline's task, init and paths."""
    from components.config import load
    from components.steps.finetune import FinetuneConfig

    layer = _step_layer(paths, output, experiment)
    return load(FinetuneConfig, settings, {**layer, "task": task, "init": init, "blind": blind})


def evaluate_config(settings: dict[str, Any], paths: dict[str, str], zero_shot: bool, experiment: str) -> Any:
    """The step's EvaluateConfig: ``settings`` (EvaluateConfig fields) under the pipeline's paths."""
    from components.config import load
    from components.steps.evaluate import EvaluateConfig

    return load(EvaluateConfig, settings, {**paths, "zero_shot": zero_shot, "experiment": experiment,
                                           "progress": False})  # fmt: skip


def pretrain_in_step(settings: dict[str, Any], paths: dict[str, str], output: str, experiment: str) -> dict[str, Any]:
    """Pretrain in this step's container (``settings["nproc"]`` processes under torchrun's elastic agent)."""
    from components.steps.pretrain import run_pretrain

    result = run_pretrain(pretrain_config(settings, paths, output, experiment))
    return {"steps": result.steps, "loss": result.final_loss, "mlflow_run": result.tracking_run_id or ""}


def object_uri(uri: str) -> str:
    """A KFP artifact URI as our storage layer reads it: ``minio://bucket/key`` (KFP's default store) and
    ``gs://`` stay out; ``minio://`` becomes ``s3://`` (the endpoint comes from AWS_ENDPOINT_URL)."""
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :]
    if uri.startswith("s3://"):
        return uri
    raise ValueError(f"the pytorchjob launcher needs artifacts in S3/MinIO, got {uri!r} (set the pipeline root)")


CONFIG_FILE = "config.json"


def job_config(settings: dict[str, Any], uris: dict[str, str], output: str, procs: int, experiment: str) -> Any:
    """The PretrainConfig the PyTorchJob's workers run: the step's settings, reading the inputs from object
    storage and writing to the shared volume, ``procs`` processes per node."""
    paths = {name: object_uri(uri) for name, uri in uris.items()}
    return pretrain_config({**settings, "nproc": procs}, paths, output, experiment)


def pretrain_command(config_file: str) -> list[str]:
    """``vilbert pretrain`` as the PyTorchJob's workers run it (under the operator's torchrun): everything is in
    the config file the step wrote, checked by the same dataclass."""
    return ["vilbert", "pretrain", "--config", config_file]


def pretrain_with_pytorchjob(
    settings: dict[str, Any], uris: dict[str, str], output: str, nodes: int, gpus_per_node: int, experiment: str
) -> dict[str, Any]:
    """Run pretraining as a PyTorchJob and publish its result into ``output``; raises when the job fails."""
    from components.config import dumps
    from components.kube.pytorchjob import fetch_template, run_pytorchjob
    from components.kube.pytorchjob_manifest import spec_from_template

    run = os.environ.get("KFP_RUN_ID") or uuid.uuid4().hex[:12]
    shared = f"{SHARED_CHECKPOINTS}/{run}/pretrain"
    procs = max(gpus_per_node, 1)
    config = job_config(settings, uris, shared, procs, experiment)  # checked here, before any pod starts
    Path(shared).mkdir(parents=True, exist_ok=True)
    config_file = Path(shared) / CONFIG_FILE
    config_file.write_text(dumps(config))
    # the cluster's suspended template (infra/ overlays) gives node selectors, tolerations, volumes and sizes
    template = fetch_template()
    overrides: dict[str, Any] = {"command": tuple(pretrain_command(str(config_file))), "nodes": nodes,
                                 "gpus_per_node": gpus_per_node, "procs_per_node": procs}  # fmt: skip
    if os.environ.get("VILBERT_TRAINING_IMAGE"):
        overrides["image"] = os.environ["VILBERT_TRAINING_IMAGE"]
    outcome = run_pytorchjob(spec_from_template(template, **overrides))
    Path(output).mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED:
        source = Path(shared) / name
        if source.is_dir():
            shutil.copytree(source, Path(output) / name, dirs_exist_ok=True)
        elif source.exists():
            shutil.copyfile(source, Path(output) / name)
        else:
            raise FileNotFoundError(f"the PyTorchJob {outcome.name} succeeded but left no {source}")
    return {"pytorchjob": outcome.name, "restarts": outcome.restarts_seen, "seconds": round(outcome.duration_s, 1)}


def pictures_page(evaluation: str, page: str) -> None:
    """An HTML page showing the evaluation's pictures inline (KFP's UI renders HTML artifacts)."""
    import base64

    pictures = sorted((Path(evaluation) / "pictures").glob("*.png"))
    parts = ["<html><body style='font-family:sans-serif'>"]
    for png in pictures:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(png.stem)}</h3><img src='data:image/png;base64,{data}' style='max-width:100%'>")
    if not pictures:
        parts.append("<p>no pictures</p>")
    parts.append("</body></html>")
    Path(page).write_text("\n".join(parts))
