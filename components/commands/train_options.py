"""Typer option types shared by ``vilbert pretrain`` and ``vilbert finetune`` (one help text per option)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Dataset = Annotated[str, typer.Option(help="Dataset root written by `vilbert ingest` (local or s3://).")]
Validation = Annotated[
    str | None,
    typer.Option(help="Folder written by `vilbert validate` (its accepted tables and quarantine are read)."),
]
Features = Annotated[str, typer.Option(help="Feature store written by `vilbert features` (local or s3://).")]
Output = Annotated[str, typer.Option(help="Output folder (local): checkpoints/, final/, step.json, result.json.")]
Preset = Annotated[str, typer.Option(help="Model preset: demo, paper-base or tiny.")]
ModelConfig = Annotated[
    str | None, typer.Option(help="Model config JSON (ours or the official format) instead of --preset.")
]
TextInit = Annotated[
    str, typer.Option(help="Text-stream BERT weights: 'minilm' (bundled MiniLM-L6), a BERT folder, or 'none'.")
]
Tokenizer = Annotated[
    str | None, typer.Option(help="Tokenizer folder or 'minilm' (default: the --text-init folder's tokenizer).")
]
MaxSteps = Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")]
Epochs = Annotated[float | None, typer.Option(help="Stop after this many passes over the data (fractions allowed).")]
BatchSize = Annotated[int, typer.Option(help="Examples per micro-batch on each process.")]
GradAccum = Annotated[int, typer.Option(help="Micro-batches accumulated per optimizer step.")]
LearningRate = Annotated[float, typer.Option(help="Peak AdamW learning rate (linear warm-up, then linear decay).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay (not on biases and LayerNorms).")]
Warmup = Annotated[float, typer.Option(help="Warm-up length as a fraction of all steps.")]
ClipNorm = Annotated[float, typer.Option(help="Clip the gradient norm to this (0: no clipping).")]
Seed = Annotated[int, typer.Option(help="Seed of weights, data order, masking and negatives.")]
CheckpointEvery = Annotated[int, typer.Option(help="Write a checkpoint every N steps (and after the last).")]
KeepLast = Annotated[int, typer.Option(help="Checkpoints to keep.")]
KeepCheckpoints = Annotated[
    bool, typer.Option(help="Keep checkpoints/ after a finished run (--no-keep-checkpoints: only final/ stays).")
]
LogEvery = Annotated[int, typer.Option(help="Log training metrics every N steps.")]
NumWorkers = Annotated[int, typer.Option(help="DataLoader worker processes per training process.")]
Device = Annotated[str, typer.Option(help="auto (cuda:<local rank> when available, else cpu), cpu, cuda, cuda:N.")]
Bf16 = Annotated[bool, typer.Option(help="bf16 autocast on GPUs that support it (never on CPU).")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads per process (default: torch's choice).")]
Resume = Annotated[
    bool, typer.Option(help="Resume from the newest valid checkpoint in the output (--no-resume refuses to).")
]
ForceResume = Annotated[
    bool, typer.Option(help="Resume even when the data or feature-spec hash differs from the checkpoint's.")
]
Nproc = Annotated[
    int, typer.Option(help="Processes on this machine (torchrun's elastic agent); ignored under external torchrun.")
]
MaxRestarts = Annotated[int, typer.Option(help="Whole-group restarts after a worker failure (resumes each time).")]
Experiment = Annotated[str, typer.Option(help="MLflow experiment.")]
RunName = Annotated[str | None, typer.Option(help="MLflow run name (default: the step's name).")]
TrackingUri = Annotated[
    str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db).")
]
Track = Annotated[bool, typer.Option(help="Record the run in MLflow (--no-track: local outputs only).")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]


def trainer_config(output: str, **options: Any) -> Any:
    """TrainerConfig from the shared options (names as above, snake_case)."""
    from components.training.config import TrainerConfig

    clip = options.pop("clip_norm")
    threads = options.pop("threads")
    warmup = options.pop("warmup")
    return TrainerConfig(
        output_dir=Path(output),
        clip_norm=clip or None,
        cpu_threads=threads,
        warmup_fraction=warmup,
        **options,
    )


def tracking_options(experiment: str, run_name: str | None, tracking_uri: str | None, track: bool) -> Any:
    from components.steps import TrackingOptions

    return TrackingOptions(experiment=experiment, run_name=run_name, tracking_uri=tracking_uri, enabled=track)
