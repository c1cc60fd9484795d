"""The ``vilbert`` console script: the steps' commands (``components.cli``) plus ``vilbert pipeline run|compile``,
the Kubeflow pipeline of ``pipelines/full.py``.

The pipeline group is added here, on the pipelines side, so that ``components`` never imports ``pipelines``
(dependency direction: pipelines -> components -> model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from components.cli import app

pipeline_app = typer.Typer(
    help="The Kubeflow pipeline (pipelines/full.py): run locally or compile.", no_args_is_help=True
)


@pipeline_app.command("run")
def pipeline_run(
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="A pipeline parameter as name=value (JSON values; repeat)."),
    ] = None,
    params_file: Annotated[str | None, typer.Option(help="YAML/JSON file of pipeline parameters.")] = None,
    pipeline_root: Annotated[Path, typer.Option(help="Where kfp.local keeps the artifacts.")] = Path("runs/kfp"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite mlflow.db).")] = None,
) -> None:
    """Run the pipeline with kfp.local (SubprocessRunner) on the embedded default; same as `python pipelines/full.py run`."""
    from pipelines.full import PipelineParamError, parse_params, run_local

    try:
        params = parse_params(param, params_file)
    except PipelineParamError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    run_local(params, pipeline_root.resolve(), tracking_uri)
    typer.echo(f"pipeline finished; artifacts under {pipeline_root}")


@pipeline_app.command("compile")
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="IR YAML to write.")] = Path("pipelines/full.yaml"),
) -> None:
    """Compile the pipeline to KFP IR YAML (same as `python pipelines/full.py compile`)."""
    from pipelines.full import compile_pipeline

    typer.echo(str(compile_pipeline(output)))


app.add_typer(pipeline_app, name="pipeline")


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
