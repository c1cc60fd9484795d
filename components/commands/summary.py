"""``vilbert summary``: where to look after a pipeline run (the table, the MLflow UI, the registered models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def summary_command(
    table: Annotated[Path, typer.Option(help="The table written by `vilbert table`.")] = Path("runs/table/table.md"),
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db).")
    ] = None,
) -> None:
    """Print the pretrained-vs-scratch table, the registered models with their aliases, and how to open the UI."""
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.table import Table

    from components.tracking import default_tracking_uri

    console = Console()
    if table.exists():
        console.rule("The paper's table on the embedded world")
        console.print(Markdown(table.read_text()))
        console.print(f"(also: {table}, {table.with_suffix('.json')})")
    else:
        console.print(f"[yellow]no table at {table} yet (run `make run`)[/]")
    uri = tracking_uri or default_tracking_uri()
    import mlflow

    client = mlflow.MlflowClient(uri)
    models = client.search_registered_models()
    listing = Table(title=f"Registered models ({uri})")
    for column in ("model", "version", "aliases", "metric", "gate"):
        listing.add_column(column)
    for model in sorted(models, key=lambda m: m.name):
        aliases = dict(model.aliases or {})
        for version in client.search_model_versions(f"name='{model.name}'"):
            names = ", ".join(a for a, v in aliases.items() if str(v) == str(version.version)) or "-"
            tags = version.tags or {}
            value = tags.get("metric.value")
            metric = f"{tags.get('metric.name', '?')} = {float(value):.1f}" if value else "-"
            listing.add_row(model.name, str(version.version), names, metric, tags.get("gate.decision", "-"))
    console.print(listing if models else "[yellow]no registered models yet[/]")
    console.print(
        "MLflow UI: `make ui`, then http://127.0.0.1:5000 (experiments, runs with pictures, Models -> aliases). "
        "Promote: `vilbert promote --name <model> --reason ...` or set the `champion` alias in the UI."
    )
