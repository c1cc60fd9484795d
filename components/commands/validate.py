"""``vilbert validate``: run the validation suites over a dataset root (and optionally a feature store)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

# Limits default to None here and ValidationLimits fills them in, so the CLI and the Python API never disagree.


def validate_command(
    dataset: Annotated[str, typer.Option(help="Dataset root written by ingest (folder or s3://bucket/prefix).")],
    output: Annotated[
        str, typer.Option(help="Folder for reports, quarantine.parquet and the accepted tables (folder or s3://).")
    ],
    features: Annotated[
        str | None, typer.Option(help="Feature store to validate as well (folder or s3://); default: none.")
    ] = None,
    min_text_chars: Annotated[
        int | None, typer.Option(help="Shortest caption/question/expression, in characters (default 1).")
    ] = None,
    max_text_chars: Annotated[
        int | None, typer.Option(help="Longest caption/question/expression, in characters (default 1000).")
    ] = None,
    min_image_side: Annotated[
        int | None, typer.Option(help="Smallest image width/height in pixels (default 8).")
    ] = None,
    max_image_side: Annotated[
        int | None, typer.Option(help="Largest image width/height in pixels (default 10000).")
    ] = None,
    min_regions: Annotated[
        int | None, typer.Option(help="Fewest regions per image in the feature store (default 10, as the paper).")
    ] = None,
    max_regions: Annotated[
        int | None, typer.Option(help="Most regions per image in the feature store (default 36, as the paper).")
    ] = None,
    class_sum_tolerance: Annotated[
        float | None, typer.Option(help="Allowed |sum - 1| of a region's class distribution (default 0.01, fp16).")
    ] = None,
    box_tolerance_px: Annotated[
        float | None, typer.Option(help="Pixels a box may stick out of its image (default 1).")
    ] = None,
    max_bad_fraction: Annotated[
        float | None, typer.Option(help="Fail when a table has more than this fraction of bad rows (default 0.05).")
    ] = None,
    tasks: Annotated[bool, typer.Option(help="Validate annotations/ and the task files under tasks/.")] = True,
    data_docs: Annotated[bool, typer.Option(help="Render the Great Expectations Data Docs site.")] = True,
    workers: Annotated[int, typer.Option(help="Threads that read, hash and decode images.")] = 4,
) -> None:
    """Validate a dataset with Great Expectations: quarantine bad rows, fail on dataset-level problems.

    Writes quarantine.parquet, gx_results.json, data_docs/, summary.md, summary.html and
    validation_report.json to OUTPUT (plus manifest.valid.parquet and captions.valid.parquet when it passes).
    Exits 1, after printing the reasons, when a dataset-level check fails.
    """
    from rich.console import Console
    from rich.table import Table

    from components.steps.validate import ValidateConfig, ValidationFailed, run_validate
    from components.validation.limits import ValidationLimits

    console = Console()
    chosen: dict[str, Any] = {
        "min_text_chars": min_text_chars,
        "max_text_chars": max_text_chars,
        "min_image_side": min_image_side,
        "max_image_side": max_image_side,
        "min_regions": min_regions,
        "max_regions": max_regions,
        "class_sum_tolerance": class_sum_tolerance,
        "box_tolerance_px": box_tolerance_px,
        "max_bad_fraction": max_bad_fraction,
    }
    try:
        limits = ValidationLimits(**{k: v for k, v in chosen.items() if v is not None})
        config = ValidateConfig(
            dataset=dataset,
            output=output,
            features=features,
            limits=limits,
            tasks=tasks,
            data_docs=data_docs,
            workers=workers,
        )
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        result = run_validate(config)
        failed = None
    except ValidationFailed as exc:
        result, failed = exc.result, exc
    table = Table(title=f"validation of {dataset}")
    for col in ("table", "rows in", "accepted", "quarantined", "status"):
        table.add_column(col)
    for name, c in result.tables.items():
        status = "[green]ok[/]" if not c.failures else "[red]FAILED[/]"
        table.add_row(name, str(c.input_rows), str(c.accepted), str(c.quarantined), status)
    console.print(table)
    if failed is not None:
        console.print(str(failed), style="red", markup=False)
        console.print(f"summary: {output}/summary.md")
        raise typer.Exit(1)
    console.print(f"[green]validation passed[/]: {result.quarantined} row(s) quarantined; reports in {output}")
