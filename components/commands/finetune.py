"""``vilbert finetune --task T``: transfer a pretrained checkpoint (or scratch) to one task.

The options are generated from :class:`components.steps.finetune.FinetuneConfig`
(components/commands/config_options.py); ``--config params.yaml`` reads its ``model`` and ``finetune`` sections, as
``dvc repro`` does."""

from __future__ import annotations

import json

import typer

from components.commands.config_options import TRAINER_RENAMES, config_command
from components.steps.finetune import FinetuneConfig


def _run(config: FinetuneConfig) -> None:
    from components.steps.finetune import run_finetune

    result = run_finetune(config)
    typer.echo(
        json.dumps(
            {
                "task": result.task,
                "output": str(result.output),
                "steps": result.steps,
                "loss": result.final_loss,
                "samples_per_s": round(result.samples_per_s, 2),
                "mlflow_run": result.tracking_run_id,
            },
        )  # fmt: skip
    )


finetune_command = config_command(
    FinetuneConfig,
    _run,
    doc="Fine-tune on one task (resumes from OUTPUT/checkpoints when interrupted); writes OUTPUT/final.",
    renames=TRAINER_RENAMES,
    first=("task", "init", "pretrained", "dataset", "validation", "features", "output"),
)
