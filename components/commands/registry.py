"""``vilbert register`` / ``promote`` / ``rollback``: the model registry (components/registry.py)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

TrackingUri = Annotated[
    str | None,
    typer.Option(help="MLflow tracking / registry URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in the "
                  "project root)."),
]  # fmt: skip
Actor = Annotated[str | None, typer.Option(help="Who makes the change (default: $USER).")]
Reason = Annotated[str, typer.Option(help="Why (recorded as a tag; required).")]
Name = Annotated[str, typer.Option(help="Registered model name, e.g. vilbert-vqa or vilbert-refcoco-plus.")]


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def register_command(
    model: Annotated[str, typer.Option(help="Fine-tuning output folder (step.json, final/, answer_vocab.json).")],
    evaluation: Annotated[str, typer.Option(help="Evaluation output folder with metrics.json (local or s3://).")],
    features: Annotated[
        str | None, typer.Option(help="Feature store whose extractor is bundled (default: the one in step.json).")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Registered model name (default: vilbert-<task>; refcoco+: vilbert-refcoco-plus)."),
    ] = None,
    tracking_uri: TrackingUri = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the register run.")] = "vilbert",
    pipeline_run: Annotated[
        str | None, typer.Option(help="Pipeline (parent) MLflow run id (default: $VILBERT_PARENT_RUN_ID).")
    ] = None,
    dvc_lock: Annotated[
        str | None, typer.Option(help="dvc.lock to read data / feature hashes from (default: the project root's).")
    ] = None,
    min_delta: Annotated[
        float, typer.Option(help="The metric must beat the champion's (and challenger's) by more than this.")
    ] = 0.0,
    output: Annotated[
        str | None, typer.Option(help="Also write the result (version, decision, aliases, tags) as JSON here.")
    ] = None,
) -> None:
    """Log a fine-tuned model as a servable MLflow pyfunc, register a version, and set `challenger` if it beats
    the champion (never moves `champion`)."""
    _no_telemetry()
    from mlflow.exceptions import MlflowException

    from components.registry import RegisterConfig, register_model

    console = _console()
    try:
        config = RegisterConfig(model=model, evaluation=evaluation, features=features, name=name,
                                tracking_uri=tracking_uri, experiment=experiment, pipeline_run=pipeline_run,
                                dvc_lock=dvc_lock, min_delta=min_delta)  # fmt: skip
        result = register_model(config, log=lambda m: console.print(m, markup=False, highlight=False))
    except (ValueError, OSError, MlflowException) as exc:  # RegistryError, BundleError, spec / storage problems
        console.print(f"[red]register failed: {exc}[/]")
        raise typer.Exit(1) from None
    if output:
        from pathlib import Path

        from components.storage import atomic_write_local

        text = json.dumps(result.to_dict(), indent=2) + "\n"
        atomic_write_local(Path(output), lambda f: f.write(text.encode()))
    summary = {k: v for k, v in result.to_dict().items() if k != "tags"}
    console.print_json(json.dumps(summary))


def promote_command(
    name: Name,
    reason: Reason,
    version: Annotated[str | None, typer.Option(help="Version to promote (default: the current challenger).")] = None,
    actor: Actor = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Move alias `champion` to a version (the old champion becomes `previous-champion`); records who, when, why."""
    from components.registry import promote

    _run(lambda: promote(name, reason, version=version, actor=actor, tracking_uri=tracking_uri), "promote")


def rollback_command(name: Name, reason: Reason, actor: Actor = None, tracking_uri: TrackingUri = None) -> None:
    """Move alias `champion` back to `previous-champion`; records who, when, why."""
    from components.registry import rollback

    _run(lambda: rollback(name, reason, actor=actor, tracking_uri=tracking_uri), "rollback")


def _no_telemetry() -> None:
    """MLflow reads this when it is first imported: set it before (nothing may phone home)."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _run(action: Any, what: str) -> None:
    _no_telemetry()
    from mlflow.exceptions import MlflowException

    from components.registry import RegistryError

    console = _console()
    try:
        change = action()
    except (RegistryError, MlflowException) as exc:
        console.print(f"[red]{what} failed: {exc}[/]")
        raise typer.Exit(1) from None
    console.print_json(json.dumps(change.to_dict()))
