"""``vilbert evaluate``: a fine-tuned model (or zero-shot retrieval with a pretrained one) on a task's test split.

The options are generated from :class:`components.steps.evaluate.EvaluateConfig`; ``--config params.yaml`` reads
its ``evaluate`` section, as ``dvc repro`` does."""

from __future__ import annotations

import typer

from components.commands.config_options import config_command
from components.steps.evaluate import EvaluateConfig


def _run(config: EvaluateConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from components.data.errors import DataError
    from components.features import FeatureSpecMismatch
    from components.steps.evaluate import run_evaluate

    console = Console()
    try:
        result = run_evaluate(config)
    except (DataError, FeatureSpecMismatch) as exc:
        console.print(f"evaluate failed: {exc}", style="red", markup=False)
        raise typer.Exit(1) from None
    kind = "zero-shot retrieval" if result.zero_shot else result.task
    table = Table(title=f"{kind} on {result.split} ({result.num_examples} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(f"[bold]{name}[/]" if name == result.metric else name, f"{value:.2f}")
    console.print(table)
    console.print(f"metrics: {result.metrics_path}\npredictions: {result.predictions_path}\n"
                  f"pictures: {len(result.pictures)}; MLflow run: {result.tracking_run_id}", markup=False)  # fmt: skip


evaluate_command = config_command(
    EvaluateConfig,
    _run,
    doc="Compute the task's official metrics on a split; write metrics.json, predictions.jsonl and pictures/.",
    first=("model", "output", "dataset", "validation", "features", "split", "zero_shot"),
)
