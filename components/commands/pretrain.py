"""``vilbert pretrain``: masked multimodal modelling + alignment on validated captions and a feature store.

The options are generated from :class:`components.steps.pretrain.PretrainConfig`
(components/commands/config_options.py); ``--config params.yaml`` reads its ``model`` and ``pretrain`` sections, as
``dvc repro`` does."""

from __future__ import annotations

import json

import typer

from components.commands.config_options import TRAINER_RENAMES, config_command
from components.steps.pretrain import PretrainConfig


def _run(config: PretrainConfig) -> None:
    from components.steps.pretrain import run_pretrain

    result = run_pretrain(config)
    typer.echo(
        json.dumps(
            {
                "output": str(result.output),
                "steps": result.steps,
                "loss": result.final_loss,
                **result.metrics,
                "samples_per_s": round(result.samples_per_s, 2),
                "mlflow_run": result.tracking_run_id,
            },
        )  # fmt: skip
    )


pretrain_command = config_command(
    PretrainConfig,
    _run,
    doc="Pretrain ViLBERT (resumes from OUTPUT/checkpoints when interrupted); writes OUTPUT/final.",
    renames=TRAINER_RENAMES,
    fan_out={"seed": ("trainer.seed", "data.seed")},
    first=("dataset", "validation", "features", "output"),
)
