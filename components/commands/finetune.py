"""``vilbert finetune --task T``: transfer a pretrained checkpoint (or scratch) to one task."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from components.commands import train_options as o


def finetune_command(
    task: Annotated[str, typer.Option(help="Task: vqa, vcr, refcoco+ or retrieval.")],
    dataset: o.Dataset,
    features: o.Features,
    output: o.Output,
    init: Annotated[
        str,
        typer.Option(
            help="'pretrained' (from --pretrained), a pretrain output / native checkpoint folder, or 'scratch' "
            "(only the text stream from BERT: the paper's no-multimodal-pretraining ablation)."
        ),
    ] = "scratch",
    pretrained: Annotated[
        str | None, typer.Option(help="The pretrain output folder that --init pretrained starts from.")
    ] = None,
    validation: o.Validation = None,
    preset: o.Preset = "demo",
    model_config: o.ModelConfig = None,
    text_init: o.TextInit = "minilm",
    tokenizer: o.Tokenizer = None,
    split: Annotated[str, typer.Option(help="Training split of the task's files.")] = "train",
    max_text_length: Annotated[
        int | None, typer.Option(help="Tokens per text (default: VQA 23, VCR 40, RefCOCO+ 20, retrieval 30).")
    ] = None,
    answer_min_count: Annotated[
        int, typer.Option(help="VQA: answers seen at least this often in training form the vocabulary.")
    ] = 9,
    max_regions: Annotated[int, typer.Option(help="Regions per image including the whole-image token.")] = 37,
    max_steps: o.MaxSteps = None,
    epochs: Annotated[
        float | None,
        typer.Option(help="Passes over the data (fractions allowed); default 3 unless --max-steps is given."),
    ] = None,
    batch_size: o.BatchSize = 32,
    grad_accum: o.GradAccum = 1,
    lr: o.LearningRate = 4e-5,
    blind: Annotated[
        bool, typer.Option(help="The task's blind baseline (scratch): no image features (RefCOCO+: boxes only).")
    ] = False,
    head_lr_mult: Annotated[
        float, typer.Option(help="The task's head (random at the start) trains at --lr times this; the trunk at --lr.")
    ] = 1.0,
    weight_decay: o.WeightDecay = 0.01,
    warmup: o.Warmup = 0.1,
    clip_norm: o.ClipNorm = 1.0,
    seed: o.Seed = 0,
    checkpoint_every: o.CheckpointEvery = 200,
    keep_checkpoints: o.KeepCheckpoints = True,
    keep_last: o.KeepLast = 2,
    log_every: o.LogEvery = 10,
    num_workers: o.NumWorkers = 0,
    device: o.Device = "auto",
    bf16: o.Bf16 = True,
    threads: o.Threads = None,
    resume: o.Resume = True,
    force_resume: o.ForceResume = False,
    nproc: o.Nproc = 1,
    max_restarts: o.MaxRestarts = 3,
    experiment: o.Experiment = "vilbert",
    run_name: o.RunName = None,
    tracking_uri: o.TrackingUri = None,
    track: o.Track = True,
    progress: o.Progress = True,
) -> None:
    """Fine-tune on one task (resumes from OUTPUT/checkpoints when interrupted); writes OUTPUT/final."""
    from components.finetune import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        task=task,
        dataset=dataset,
        features=features,
        init=init,
        pretrained=pretrained,
        validation=validation,
        trainer=o.trainer_config(
            output,
            max_steps=max_steps,
            epochs=epochs if epochs is not None or max_steps is not None else 3.0,
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
        split=split,
        max_text_length=max_text_length,
        answer_min_count=answer_min_count,
        blind=blind,
        head_lr_mult=head_lr_mult,
        max_regions=max_regions,
        nproc=nproc,
        max_restarts=max_restarts,
        tracking=o.tracking_options(experiment, run_name, tracking_uri, track),
    )
    result = run_finetune(config)
    typer.echo(
        json.dumps(
            {
                "task": result.task,
                "output": str(result.output),
                "steps": result.steps,
                "loss": result.final_loss,
                "samples_per_s": round(result.samples_per_s, 2),
                "mlflow_run": result.tracking_run_id,
            },
        )  # fmt: skip
    )
