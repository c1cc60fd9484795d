"""``vilbert table``: the paper's pretrained-vs-not table from evaluation outputs."""

from __future__ import annotations

from typing import Annotated

import typer


def table_command(
    evaluations: Annotated[
        list[str],
        typer.Option(help="Evaluation output folders, or folders searched for metrics.json (repeat the option)."),
    ],
    output: Annotated[str, typer.Option(help="Folder for table.md and table.json.")],
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "vilbert",
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db).")
    ] = None,
    track: Annotated[bool, typer.Option(help="Record the table in MLflow.")] = True,
) -> None:
    """Tabulate (a) pretrained, (b) no multimodal pretraining, (c) zero-shot, per task, mean ± std over seeds."""
    from components.steps.common import TrackingOptions
    from components.steps.table import TableConfig, run_table

    result = run_table(
        TableConfig(
            evaluations=tuple(evaluations),
            output=output,
            tracking=TrackingOptions(experiment=experiment, tracking_uri=tracking_uri, enabled=track),
        )
    )
    typer.echo(result.markdown)
