"""``vilbert evaluate``: a fine-tuned model (or zero-shot retrieval with a pretrained one) on a task's test split."""

from __future__ import annotations

from typing import Annotated

import typer


def evaluate_command(
    model: Annotated[
        str, typer.Option(help="Output folder of finetune (or of pretrain, with --zero-shot): step.json + final/.")
    ],
    output: Annotated[str, typer.Option(help="Folder for metrics.json, predictions.jsonl, pictures/ (or s3://).")],
    dataset: Annotated[
        str | None, typer.Option(help="Dataset root (folder or s3://); default: the one in <model>/step.json.")
    ] = None,
    validation: Annotated[
        str | None, typer.Option(help="Validation folder whose rejected rows are dropped; default: from step.json.")
    ] = None,
    features: Annotated[
        str | None, typer.Option(help="Feature store (must match the model's feature spec); default: from step.json.")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate: test, val, ...")] = "test",
    zero_shot: Annotated[
        bool, typer.Option(help="Zero-shot image retrieval with the pretrained alignment head of a pretrain output.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass (retrieval: images per pass).")] = 32,
    max_examples: Annotated[
        int | None, typer.Option(help="Only the first N examples (retrieval: captions), for smoke runs.")
    ] = None,
    pictures: Annotated[int, typer.Option(help="Examples per picture; 0 draws no pictures.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:<n>.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes that build batches.")] = 0,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "vilbert",
    run_name: Annotated[
        str | None, typer.Option(help="MLflow run name (default: evaluate-<task> / evaluate-zero-shot-retrieval).")
    ] = None,
    tracking: Annotated[bool, typer.Option(help="Track the run in MLflow.")] = True,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Compute the task's official metrics on a split; write metrics.json, predictions.jsonl and pictures/."""
    from rich.console import Console
    from rich.table import Table

    from components.data.common import DataError
    from components.features import FeatureSpecMismatch
    from components.steps.evaluate import EvaluateConfig, run_evaluate

    console = Console()
    try:
        config = EvaluateConfig(
            model=model, output=output, dataset=dataset, validation=validation, features=features, split=split,
            zero_shot=zero_shot, batch_size=batch_size, max_examples=max_examples, pictures=pictures, device=device,
            threads=threads, workers=workers, experiment=experiment, run_name=run_name, tracking=tracking,
            tracking_uri=tracking_uri, progress=progress,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
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
