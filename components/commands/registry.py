"""``vilbert register`` / ``promote`` / ``rollback`` / ``serve`` and ``vilbert registry ui`` / ``listen``: the model
registry (components/steps/register.py), its events (components/registry/events.py) and serving the champion
(components/serving/live.py)."""

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

    from components.steps.register import RegisterConfig, register_model

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
    from components.registry.rules import promote

    _run(lambda: promote(name, reason, version=version, actor=actor, tracking_uri=tracking_uri), "promote")


def rollback_command(name: Name, reason: Reason, actor: Actor = None, tracking_uri: TrackingUri = None) -> None:
    """Move alias `champion` back to `previous-champion`; records who, when, why."""
    from components.registry.rules import rollback

    _run(lambda: rollback(name, reason, actor=actor, tracking_uri=tracking_uri), "rollback")


def _no_telemetry() -> None:
    """MLflow reads this when it is first imported: set it before (nothing may phone home)."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _run(action: Any, what: str) -> None:
    _no_telemetry()
    from mlflow.exceptions import MlflowException

    from components.registry.rules import RegistryError

    console = _console()
    try:
        change = action()
    except (RegistryError, MlflowException) as exc:
        console.print(f"[red]{what} failed: {exc}[/]")
        raise typer.Exit(1) from None
    console.print_json(json.dumps(change.to_dict()))


# --- registry events and serving ------------------------------------------------------------------------------

registry_app = typer.Typer(help="Registry events: the MLflow UI with the alias audit beside it.", no_args_is_help=True)
Host = Annotated[str, typer.Option(help="Interface to listen on (loopback unless you mean otherwise).")]


def _plain_log() -> Any:
    """A log function printing each line as it is (no rich markup: lines carry URIs and JSON)."""
    console = _console()
    return lambda message: console.print(message, markup=False, highlight=False)


def _serve_until_stopped(start: Any, stop: Any) -> None:
    """``start()``, then wait for Ctrl-C or SIGTERM, then ``stop()`` (always)."""
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()


@registry_app.command("ui")
def ui_command(
    backend_store_uri: Annotated[
        str | None, typer.Option(help="MLflow store the UI shows (default: sqlite mlflow.db in the project root).")
    ] = None,
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    listen_port: Annotated[int, typer.Option(help="Port of the alias-event receiver (webhook).")] = 5005,
    state_file: Annotated[
        str | None,
        typer.Option(help="Where the webhook secret and encryption key are kept (default: under $XDG_STATE_HOME)."),
    ] = None,
) -> None:
    """The MLflow UI (`mlflow server`, webhooks on) with `registry listen` beside it: promotions in the UI are
    audited, keep `previous-champion`, and reach `vilbert serve` (stop with Ctrl-C)."""
    _no_telemetry()
    from pathlib import Path

    from components.registry.ui import run_ui
    from components.tracking import default_tracking_uri

    store = backend_store_uri or default_tracking_uri()
    run_ui(store, host, port, listen_port, Path(state_file) if state_file else None, log=_plain_log())


@registry_app.command("listen")
def listen_command(
    tracking_uri: Annotated[str, typer.Option(help="The mlflow server (http://...) whose alias events to audit.")],
    secret: Annotated[
        str,
        typer.Option(envvar="VILBERT_WEBHOOK_SECRET", help="HMAC secret of the webhook (or $VILBERT_WEBHOOK_SECRET)."),
    ],
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the receiver.")] = 5005,
) -> None:
    """Audit alias changes of an `mlflow server` (which must allow loopback webhooks, see components/registry/ui.py):
    who/when/previous holder in `alias.history`, `previous-champion` kept, broken rules flagged."""
    _no_telemetry()
    from components.registry.ui import Listener

    listener = Listener(tracking_uri, secret, host, port, _plain_log())
    _serve_until_stopped(listener.start, listener.stop)


def serve_command(
    name: Name,
    tracking_uri: TrackingUri = None,
    alias: Annotated[str, typer.Option(help="Alias to serve and follow.")] = "champion",
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of POST /invocations.")] = 5001,
    poll: Annotated[float, typer.Option(help="Also check the alias every this many seconds (0: events only).")] = 30.0,
    webhook: Annotated[bool, typer.Option(help="Subscribe to the server's alias events (http(s) registry).")] = True,
) -> None:
    """Serve models:/NAME@champion and follow it: a newly promoted version is loaded and health-checked, then
    takes over (the old one keeps serving if it fails); every answer names the version that gave it."""
    _no_telemetry()
    from components.serving.live import ChampionService, ServeConfig

    try:
        config = ServeConfig(name=name, tracking_uri=tracking_uri, alias=alias, host=host, port=port, poll_s=poll,
                             webhook=webhook)  # fmt: skip
    except ValueError as exc:
        _console().print(f"[red]serve failed: {exc}[/]")
        raise typer.Exit(1) from None
    service = ChampionService(config, log=_plain_log())
    _serve_until_stopped(service.start, service.stop)
