"""``vilbert pretrain``: masked multimodal modelling + alignment on validated captions and a feature store."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from components.commands import train_options as o


def pretrain_command(
    dataset: o.Dataset,
    features: o.Features,
    output: o.Output,
    validation: o.Validation = None,
    preset: o.Preset = "demo",
    model_config: o.ModelConfig = None,
    text_init: o.TextInit = "minilm",
    tokenizer: o.Tokenizer = None,
    max_steps: o.MaxSteps = None,
    epochs: Annotated[
        float | None,
        typer.Option(help="Passes over the data (fractions allowed); default 1 unless --max-steps is given."),
    ] = None,
    batch_size: o.BatchSize = 32,
    grad_accum: o.GradAccum = 1,
    lr: o.LearningRate = 1e-4,
    weight_decay: o.WeightDecay = 0.01,
    warmup: o.Warmup = 0.1,
    clip_norm: o.ClipNorm = 1.0,
    seed: o.Seed = 0,
    checkpoint_every: o.CheckpointEvery = 200,
    keep_checkpoints: o.KeepCheckpoints = True,
    keep_last: o.KeepLast = 3,
    log_every: o.LogEvery = 10,
    num_workers: o.NumWorkers = 0,
    device: o.Device = "auto",
    bf16: o.Bf16 = True,
    threads: o.Threads = None,
    resume: o.Resume = True,
    force_resume: o.ForceResume = False,
    max_text_length: Annotated[int, typer.Option(help="Tokens per caption including [CLS] and [SEP].")] = 36,
    max_regions: Annotated[int, typer.Option(help="Regions per image including the whole-image token.")] = 37,
    word_mask_prob: Annotated[float, typer.Option(help="Share of word pieces masked (80/10/10).")] = 0.15,
    region_mask_prob: Annotated[float, typer.Option(help="Share of regions masked (features zeroed 90%).")] = 0.15,
    negative_prob: Annotated[float, typer.Option(help="Share of pairs whose caption is another image's.")] = 0.5,
    masked_pairs: Annotated[
        str,
        typer.Option(
            help="Pairs whose masked words and regions are predicted: all (the original) or matched (only the "
            "image's own captions; mismatched pairs are masked the same way, unsupervised)."
        ),
    ] = "all",
    split: Annotated[str, typer.Option(help="Captions of this split.")] = "train",
    nproc: o.Nproc = 1,
    max_restarts: o.MaxRestarts = 3,
    experiment: o.Experiment = "vilbert",
    run_name: o.RunName = None,
    tracking_uri: o.TrackingUri = None,
    track: o.Track = True,
    progress: o.Progress = True,
) -> None:
    """Pretrain ViLBERT (resumes from OUTPUT/checkpoints when interrupted); writes OUTPUT/final."""
    from components.data.pretraining import PretrainingDataConfig
    from components.pretrain import PretrainConfig, run_pretrain

    config = PretrainConfig(
        dataset=dataset,
        features=features,
        validation=validation,
        trainer=o.trainer_config(
            output,
            max_steps=max_steps,
            epochs=epochs if epochs is not None or max_steps is not None else 1.0,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            clip_norm=clip_norm,
            seed=seed,
            checkpoint_every=checkpoint_every,
            keep_last=keep_last,
            keep_checkpoints=keep_checkpoints,
            log_every=log_every,
            num_workers=num_workers,
            device=device,
            bf16=bf16,
            threads=threads,
            resume=resume,
            force_resume=force_resume,
            progress=progress,
        ),  # fmt: skip
        preset=preset,
        model_config_file=model_config,
        text_init=text_init,
        tokenizer=tokenizer,
        data=PretrainingDataConfig(
            split=split,
            max_text_length=max_text_length,
            word_mask_prob=word_mask_prob,
            region_mask_prob=region_mask_prob,
            negative_prob=negative_prob,
            masked_pairs=masked_pairs,
            seed=seed,
        ),
        max_regions=max_regions,
        nproc=nproc,
        max_restarts=max_restarts,
        tracking=o.tracking_options(experiment, run_name, tracking_uri, track),
    )
    result = run_pretrain(config)
    typer.echo(
        json.dumps(
            {
                "output": str(result.output),
                "steps": result.steps,
                "loss": result.final_loss,
                **result.metrics,
                "samples_per_s": round(result.samples_per_s, 2),
                "mlflow_run": result.tracking_run_id,
            },
        )  # fmt: skip
    )
