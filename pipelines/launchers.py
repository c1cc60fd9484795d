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


def _pretrain_config(options: dict[str, Any], output: str) -> Any:
    """The step's PretrainConfig; checkpoints are dropped once final/ is written (the artifact is the model)."""
    from components.data.pretraining import PretrainingDataConfig
    from components.pretrain import PretrainConfig
    from components.steps import TrackingOptions
    from components.training.config import TrainerConfig

    return PretrainConfig(
        dataset=options["dataset"],
        validation=options["validation"],
        features=options["features"],
        preset=options["preset"],
        text_init=options["text_init"],
        data=PretrainingDataConfig(seed=options["seed"], masked_pairs=options["masked_pairs"]),
        nproc=options["nproc"],
        trainer=TrainerConfig(
            output_dir=Path(output),
            epochs=options["epochs"] or None,
            max_steps=options["max_steps"] or None,
            batch_size=options["batch_size"],
            lr=options["lr"],
            seed=options["seed"],
            checkpoint_every=options["checkpoint_every"],
            progress=False,
            keep_checkpoints=False,
        ),  # fmt: skip
        tracking=TrackingOptions(experiment=options["experiment"]),
    )


def pretrain_in_step(options: dict[str, Any], output: str) -> dict[str, Any]:
    """Pretrain in this step's container; checkpoints are dropped once ``final/`` is written."""
    from components.pretrain import run_pretrain

    result = run_pretrain(_pretrain_config(options, output))
    return {"steps": result.steps, "loss": result.final_loss, "mlflow_run": result.tracking_run_id or ""}


def object_uri(uri: str) -> str:
    """A KFP artifact URI as our storage layer reads it: ``minio://bucket/key`` (KFP's default store) and
    ``gs://`` stay out; ``minio://`` becomes ``s3://`` (the endpoint comes from AWS_ENDPOINT_URL)."""
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :]
    if uri.startswith("s3://"):
        return uri
    raise ValueError(f"the pytorchjob launcher needs artifacts in S3/MinIO, got {uri!r} (set the pipeline root)")


def pretrain_command(options: dict[str, Any], uris: dict[str, str], output: str, procs: int) -> list[str]:
    """``vilbert pretrain`` as the PyTorchJob's workers run it (under the operator's torchrun)."""
    return [
        "vilbert", "pretrain",
        "--dataset", object_uri(uris["dataset"]),
        "--validation", object_uri(uris["validation"]),
        "--features", object_uri(uris["features"]),
        "--output", output,
        "--preset", options["preset"],
        "--text-init", options["text_init"],
        "--epochs", str(options["epochs"]),
        *(["--max-steps", str(options["max_steps"])] if options["max_steps"] else []),
        "--batch-size", str(options["batch_size"]),
        "--lr", str(options["lr"]),
        "--masked-pairs", options["masked_pairs"],
        "--seed", str(options["seed"]),
        "--checkpoint-every", str(options["checkpoint_every"]),
        "--nproc", str(procs),
        "--experiment", options["experiment"],
        "--no-progress",
    ]  # fmt: skip


def pretrain_with_pytorchjob(
    options: dict[str, Any], uris: dict[str, str], output: str, nodes: int, gpus_per_node: int
) -> dict[str, Any]:
    """Run pretraining as a PyTorchJob and publish its result into ``output``; raises when the job fails."""
    from components.kube.pytorchjob import fetch_template, run_pytorchjob
    from components.kube.pytorchjob_manifest import spec_from_template

    run = os.environ.get("KFP_RUN_ID") or uuid.uuid4().hex[:12]
    shared = f"{SHARED_CHECKPOINTS}/{run}/pretrain"
    procs = max(gpus_per_node, 1)
    # the cluster's suspended template (infra/ overlays) gives node selectors, tolerations, volumes and sizes
    template = fetch_template()
    overrides: dict[str, Any] = {"command": tuple(pretrain_command(options, uris, shared, procs)), "nodes": nodes,
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
