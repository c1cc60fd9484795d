"""``vilbert ingest``: read a source into a dataset root (manifest, captions, quarantine, images)."""

from __future__ import annotations

from typing import Annotated

import typer


def ingest_command(
    source: Annotated[
        str,
        typer.Option(
            help="Source URI: synthetic://shapes?seed=0&n=100, a local folder or file, or s3://bucket/prefix."
        ),
    ],
    output: Annotated[str, typer.Option(help="Dataset root to write: a local folder or s3://bucket/prefix.")],
    split_policy: Annotated[
        str, typer.Option(help="'source': keep the source's splits (hash the rest); 'hash': always hash the image id.")
    ] = "source",
    split_fractions: Annotated[
        str, typer.Option(help="train,val,test shares for hashed splits, summing to 1.")
    ] = "0.8,0.1,0.1",
    split_salt: Annotated[str, typer.Option(help="Salt for the split hash (another salt, another split).")] = "",
    allowed_formats: Annotated[
        str, typer.Option(help="Comma-separated PIL formats to accept (others are quarantined).")
    ] = "JPEG,PNG,WEBP",
    max_image_pixels: Annotated[
        int, typer.Option(help="Reject images with more pixels than this (decompression-bomb guard).")
    ] = 40_000_000,
    max_image_bytes: Annotated[int, typer.Option(help="Reject image files larger than this many bytes.")] = 32 << 20,
    max_caption_chars: Annotated[int, typer.Option(help="Reject captions longer than this many characters.")] = 1000,
    workers: Annotated[int, typer.Option(help="Threads reading, decoding and writing images.")] = 8,
    remove_stale: Annotated[
        bool, typer.Option(help="Delete images of earlier runs that the new manifest no longer names.")
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    fail_on_quarantine: Annotated[bool, typer.Option(help="Exit with status 2 when any row was quarantined.")] = False,
) -> None:
    """Ingest a data source: check every image and caption, store images unchanged, quarantine the rest."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from components.sources import SourceFormatError
    from components.sources.conceptual_captions import FetchUnavailable
    from components.steps.ingest import IngestConfig, run_ingest
    from components.storage import StorageError

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        config = IngestConfig(
            source=source,
            output=output,
            split_policy=split_policy,
            split_fractions=tuple(float(x) for x in split_fractions.split(",")),  # type: ignore[arg-type]
            split_salt=split_salt,
            allowed_formats=tuple(f.strip() for f in allowed_formats.split(",") if f.strip()),
            max_image_pixels=max_image_pixels,
            max_image_bytes=max_image_bytes,
            max_caption_chars=max_caption_chars,
            workers=workers,
            remove_stale=remove_stale,
            progress=progress,
        )
        result = run_ingest(config)
    except (ValueError, StorageError, SourceFormatError, FetchUnavailable) as exc:
        console.print(f"[red]ingest failed: {exc}[/]")
        raise typer.Exit(1) from None
    table = Table(title=f"ingest {source} -> {output} ({result.seconds:.1f} s, {result.images_per_s:.1f} images/s)")
    for col in ("table", "seen", "stored", "skipped unchanged", "quarantined", "reasons"):
        table.add_column(col)
    for name, counts in (("images", result.images), ("captions", result.captions), ("files", result.files)):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.reasons.items()))
        row = (counts.seen, counts.stored, counts.skipped_unchanged, counts.quarantined)
        table.add_row(name, *map(str, row), reasons or "-")
    console.print(table)
    console.print("splits: " + ", ".join(f"{k} {v}" for k, v in result.splits.items()))
    quarantined = result.images.quarantined + result.captions.quarantined + result.files.quarantined
    if fail_on_quarantine and quarantined:
        raise typer.Exit(2)
