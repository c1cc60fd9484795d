"""The ``vilbert`` command line of the steps.  Thin: parse, call a function, print the result, set the exit code.

The console script is ``pipelines.cli:app``: this app plus the ``pipeline`` group (the Kubeflow pipeline lives on
the pipelines side, which imports components, never the reverse)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from components.data import DEFAULT_MAX_REGIONS

app = typer.Typer(
    help="ViLBERT: pretrain, fine-tune and run the model lifecycle.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
model_app = typer.Typer(
    help="Model tools: parity with the original, benchmarks, checkpoint conversion.", no_args_is_help=True
)
app.add_typer(model_app, name="model")


@app.callback()
def _setup(
    log_level: Annotated[str, typer.Option(help="Log level of the steps' messages (DEBUG, INFO, WARNING).")] = "INFO",
) -> None:
    """ViLBERT: pretrain, fine-tune and run the model lifecycle."""
    import logging

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


console = Console(width=None if sys.stdout.isatty() else 160)

#: Reference vectors made with the original code (a copy of shared/reference/vilbert ships with the tests).
DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "reference_vilbert"


@app.command("run")
def run_main(
    force: Annotated[bool, typer.Option(help="Re-run every stage (dvc repro --force).")] = False,
) -> None:
    """The main job: the whole pipeline on the embedded default (`dvc repro` in the project), then a summary."""
    import subprocess

    from components.commands.summary import summary_command

    dvc = Path(sys.executable).with_name("dvc")
    code = subprocess.call([str(dvc), "repro", *(["--force"] if force else [])])
    if code:
        raise typer.Exit(code)
    summary_command()


@model_app.command("demo")
def demo(
    steps: Annotated[int, typer.Option(help="Pretraining steps (forward, backward, AdamW) to run.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed for the weights that are not from MiniLM and the batch.")] = 0,
) -> None:
    """Build the demo model from the bundled MiniLM BERT and run a few pretraining steps."""
    from components.bench.demo import run_demo

    run_demo(steps=steps, seed=seed, log=console.print)


@model_app.command("parity")
def parity(
    reference: Annotated[
        Path,
        typer.Option(help="Folder of reference vectors made with the original code.", exists=True, file_okay=False),
    ] = DEFAULT_REFERENCE,
    threads: Annotated[int, typer.Option(help="torch CPU threads (the vectors were made with 1).")] = 1,
    verbose: Annotated[bool, typer.Option(help="Print every compared tensor, not only the worst per config.")] = False,
) -> None:
    """Load the official checkpoints in REFERENCE and compare every output with the original's."""
    import torch

    from model.parity import check_reference_dir

    torch.set_num_threads(threads)
    results = check_reference_dir(reference)
    table = Table(title=f"ViLBERT parity with the original ({reference})")
    for col in ("config", "dtype", "tensors", "worst tensor", "max |diff|", "max rel diff", "result"):
        table.add_column(col)
    for res in results:
        for dtype in sorted({c.dtype for c in res.comparisons}):
            comps = [c for c in res.comparisons if c.dtype == dtype]
            worst = max(comps, key=lambda c: c.max_abs)
            rows = comps if verbose else [worst]
            for c in rows:
                table.add_row(
                    res.config,
                    dtype,
                    str(len(comps)),
                    c.name,
                    f"{c.max_abs:.3e}",
                    f"{max(x.max_rel for x in comps) if c is worst else c.max_rel:.3e}",
                    "[green]ok[/]" if all(x.ok for x in comps) else "[red]MISMATCH[/]",
                )
        for err in res.errors:
            console.print(f"[red]{res.config}: {err}[/]")
        bad = [c.name for c in res.comparisons if not c.ok]
        if bad:
            console.print(f"[red]{res.config}: mismatches in {', '.join(bad)}[/]")
    console.print(table)
    ok = all(r.ok for r in results)
    console.print("[green]parity: all outputs match[/]" if ok else "[red]parity: FAILED[/]")
    raise typer.Exit(0 if ok else 1)


@model_app.command("bench")
def bench(
    preset: Annotated[str, typer.Option(help="Model preset: paper-base, demo or tiny.")] = "demo",
    batch_size: Annotated[int, typer.Option(help="Examples per training step.")] = 8,
    text_len: Annotated[int, typer.Option(help="Tokens per caption (padded).")] = 36,
    regions: Annotated[
        int, typer.Option(help="Regions per image, the whole-image token included.")
    ] = DEFAULT_MAX_REGIONS,
    steps: Annotated[int, typer.Option(help="Timed training steps.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 2,
    repeats: Annotated[int, typer.Option(help="Alternate runs per implementation; the best is kept.")] = 1,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    reference_src: Annotated[
        Path | None,
        typer.Option(help="Checkout of jiasenlu/vilbert_beta: also time the original, same weights and batch."),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the full result as JSON here.")] = None,
) -> None:
    """Training throughput (samples/s) and peak memory, optionally against the original implementation."""
    from components.bench.throughput import benchmark

    result = benchmark(
        preset,
        batch_size,
        text_len,
        regions,
        steps,
        warmup,
        threads,
        str(reference_src) if reference_src else None,
        device=device,
        repeats=repeats,
    )
    table = Table(
        title=f"training step, {preset}, batch {batch_size}, text {text_len}, regions {regions}, "
        f"{result['threads']} threads, {device}"
    )
    for col in ("implementation", "samples/s", "step ms", "peak RSS MB"):
        table.add_column(col)
    for kind in ("ours", "reference"):
        r = result.get(kind)
        if r:
            table.add_row(kind, f"{r['samples_per_s']:.2f}", f"{r['step_ms']:.0f}", f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    if result.get("ratios"):
        console.print("ours / original: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items()))
    if output:
        output.write_text(json.dumps(result, indent=2) + "\n")


@model_app.command("convert")
def convert(
    weights: Annotated[Path, typer.Argument(help="Official checkpoint (.bin/.pth/.safetensors).", exists=True)],
    config: Annotated[
        Path, typer.Argument(help="Its official config JSON (e.g. bert_base_6layer_6conect.json).", exists=True)
    ],
    output: Annotated[Path, typer.Argument(help="Native checkpoint directory to write.")],
    kind: Annotated[str, typer.Option(help="'pretraining' or 'tasks' (the VL-tasks model).")] = "pretraining",
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="Folder with the tokenizer to bundle (default: the bundled bert-base-uncased vocab)."),
    ] = None,
    strict: Annotated[bool, typer.Option(help="Fail on any missing/unexpected key.")] = True,
) -> None:
    """Convert an official ViLBERT checkpoint into a native checkpoint directory."""
    from model.checkpoint import load_official, save_checkpoint
    from model.convert import CheckpointMismatch
    from model.tokenizer import load_tokenizer

    try:
        model, report = load_official(weights, config, kind=kind, strict=strict)
    except CheckpointMismatch as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(report.summary())
    save_checkpoint(model, output, tokenizer=load_tokenizer(tokenizer))
    console.print(f"wrote {output}")


@model_app.command("export-official")
def export_official(
    checkpoint: Annotated[Path, typer.Argument(help="Native checkpoint directory.", exists=True, file_okay=False)],
    output: Annotated[Path, typer.Argument(help="Output folder: pytorch_model.bin + official config.json.")],
) -> None:
    """Write a native checkpoint in the original code's key format (loadable by the reference, strict)."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.convert import export_official_state_dict

    model = load_checkpoint(checkpoint)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(export_official_state_dict(model), output / "pytorch_model.bin")
    (output / "config.json").write_text(json.dumps(model.config.to_official(), indent=2) + "\n")
    console.print(f"wrote {output / 'pytorch_model.bin'} and {output / 'config.json'}")


@model_app.command("presets")
def presets() -> None:
    """List the model presets with their sizes."""
    import torch

    from model import ViLBertForPretraining
    from model.checkpoint import count_parameters
    from model.config import PRESETS, preset

    table = Table(title="model presets")
    for col in ("preset", "text", "vision", "co-attention", "parameters"):
        table.add_column(col)
    for name in PRESETS:
        cfg = preset(name)
        t, v, c = cfg.text, cfg.vision, cfg.coattention
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            n = count_parameters(ViLBertForPretraining(cfg))
        table.add_row(
            name,
            f"{t.num_layers}L x {t.hidden_size}",
            f"{v.num_layers}L x {v.hidden_size}",
            f"{c.num_blocks} x {c.hidden_size}",
            f"{n / 1e6:.1f}M",
        )
    console.print(table)


# --- step commands (one registration line per step module) ---
from components.commands.summary import summary_command  # noqa: E402

app.command("summary")(summary_command)
from components.commands.table import table_command  # noqa: E402

app.command("table")(table_command)
from components.commands.registry import (  # noqa: E402
    promote_command,
    register_command,
    registry_app,
    rollback_command,
    serve_command,
)

app.command("register")(register_command)
app.command("promote")(promote_command)
app.command("rollback")(rollback_command)
app.command("serve")(serve_command)
app.add_typer(registry_app, name="registry")
from components.commands.evaluate import evaluate_command  # noqa: E402

app.command("evaluate")(evaluate_command)
from components.commands.finetune import finetune_command  # noqa: E402

app.command("finetune")(finetune_command)
from components.commands.pretrain import pretrain_command  # noqa: E402

app.command("pretrain")(pretrain_command)
from components.commands.features import features_command  # noqa: E402

app.command("features")(features_command)
from components.commands.validate import validate_command  # noqa: E402

app.command("validate")(validate_command)
from components.commands.ingest import ingest_command  # noqa: E402

app.command("ingest")(ingest_command)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
