"""``vilbert pretrain``: the paper's proxy tasks (masked words, masked regions against the detector's class
distributions, image-caption alignment) on validated captions and a feature store.

``run_pretrain(config)`` trains in this process, on ``nproc`` local processes under torchrun's elastic agent
(restarts resume from the last checkpoint), or as one rank of an external torchrun / PyTorchJob.  Output: the
trainer's layout plus ``step.json`` and ``result.json`` (DATA_CONTRACTS.md, "Step outputs around the trainer").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from components import storage
from components.config import to_mapping
from components.data import DEFAULT_MAX_REGIONS
from components.data.pretraining_config import CAPTIONS_VALID, PretrainingDataConfig
from components.steps.common import (
    MINILM,
    RESULT_FILE,
    STEP_FILE,
    StepError,
    TrackingOptions,
    feature_spec_hash,
    model_config,
    resolve_text_init,
    resolve_tokenizer,
    run_on_processes,
    sha256_of,
    tracking_key,
    train_tracked,
    write_json,
)
from components.training.config import TrainerConfig

log = logging.getLogger(__name__)

#: Loss parts reported per step (the model's output fields).
LOSS_PARTS = ("masked_lm_loss", "masked_region_loss", "alignment_loss")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything ``vilbert pretrain`` needs; ``trainer.output_dir`` is the step's output folder.

    The command line, params.yaml (sections ``model`` and ``pretrain``), the Kubeflow op and the PyTorchJob all
    build it with :func:`components.config.load`: its fields are the only declaration of the step's settings."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "pretrain")
    """The sections of params.yaml that ``--config params.yaml`` reads, in order."""
    STEP_DEFAULTS: ClassVar[dict[str, Any]] = {"trainer": {"batch_size": 32, "checkpoint_every": 200}}
    """Pretraining's own trainer defaults (over TrainerConfig's)."""
    DEFAULT_EPOCHS: ClassVar[float] = 1.0
    """Passes over the captions when neither ``trainer.epochs`` nor ``trainer.max_steps`` is set."""

    dataset: str
    """Dataset root written by ``ingest`` (local or s3://)."""
    features: str
    """Feature store written by ``features`` (local or s3://); must fit the model (D, and C for KL)."""
    trainer: TrainerConfig
    """How to train; its ``output_dir`` is where checkpoints, ``final/``, step.json and result.json go."""
    validation: str | None = None
    """Folder written by ``validate``: its ``captions.valid.parquet`` is read.  None: the dataset's raw
    ``captions.parquet`` (unvalidated; a warning is logged)."""
    preset: str = "demo"
    """Model preset (``demo``, ``paper-base``, ``tiny``)."""
    model_config_file: str | None = None
    """A model config JSON (ours or the official format) instead of the preset."""
    text_init: str = MINILM
    """BERT weights for the text stream: ``minilm`` (bundled MiniLM-L6), a folder, or ``none`` (random)."""
    tokenizer: str | None = None
    """Tokenizer folder or ``minilm``; default: the text-init folder's tokenizer."""
    data: PretrainingDataConfig = field(default_factory=PretrainingDataConfig)
    """Which captions and how to mask them."""
    max_regions: int = DEFAULT_MAX_REGIONS
    """Regions per image including the whole-image token (the paper: 36 + 1)."""
    nproc: int = 1
    """Processes on this machine (torchrun's elastic agent); ignored under an external torchrun."""
    max_restarts: int = 3
    """Whole-group restarts after a worker failure (each resumes from the last checkpoint)."""
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    """MLflow tracking."""

    def __post_init__(self) -> None:
        if self.model_config_file is None:
            from model.config import PRESETS

            if self.preset not in PRESETS:
                raise StepError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.nproc < 1:
            raise StepError(f"nproc must be >= 1, got {self.nproc}")
        if self.max_restarts < 0:
            raise StepError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.max_regions < 2:
            raise StepError(f"max_regions must be >= 2, got {self.max_regions}")
        if storage.is_s3(str(self.trainer.output_dir)):
            raise StepError("the output folder must be local (checkpoints are renamed atomically)")

    @property
    def output(self) -> Path:
        return Path(self.trainer.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


@dataclass
class PretrainResult:
    """What ``run_pretrain`` did."""

    output: Path
    """The step's output folder."""
    final_dir: Path | None
    """``output/final``: the pretrained checkpoint."""
    steps: int
    """Optimizer steps completed (with those before a resume)."""
    final_loss: float
    """Training loss of the last step (averaged over ranks)."""
    metrics: dict[str, float]
    """The last step's loss parts."""
    samples_per_s: float
    """Training throughput of the last process group."""
    resumed_step: int
    """The step the last process group started from."""
    tracking_run_id: str | None
    """The MLflow run."""


def captions_uri(config: PretrainConfig) -> str:
    if config.validation:
        return storage.join(config.validation, CAPTIONS_VALID)
    log.warning("no validation folder given: pretraining on the unvalidated captions.parquet of %s", config.dataset)
    return storage.join(config.dataset, "captions.parquet")


def _worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One rank's pretraining (this process, a torchrun worker, or a PyTorchJob pod)."""
    import torch

    from components.data.collate import model_inputs
    from components.data.pretraining import PretrainingDataset
    from components.data.regions import RegionSource
    from components.training.distributed import dist_info_from_env
    from model import ViLBertForPretraining
    from model.checkpoint import load_bert_text_stream

    config: PretrainConfig = payload["config"]
    info = dist_info_from_env()
    torch.manual_seed(config.trainer.seed)  # same initial weights on every rank (DDP also broadcasts them)
    mconfig = model_config(config.preset, config.model_config_file)
    model = ViLBertForPretraining(mconfig)
    bert = resolve_text_init(config.text_init)
    if bert is not None:
        report = load_bert_text_stream(model, bert)
        if info.is_main:
            log.info("text stream from %s: %d tensors", bert, len(report.loaded))
    tokenizer = resolve_tokenizer(config.tokenizer, config.text_init)
    regions = RegionSource(config.features, mconfig, max_regions=config.max_regions)
    dataset = PretrainingDataset(payload["captions"], regions, tokenizer, config.data)

    def loss_fn(model, batch):
        out = model(**model_inputs(batch))
        parts = {name.removesuffix("_loss"): getattr(out, name) for name in LOSS_PARTS}
        return out.loss, {k: float(v.detach()) for k, v in parts.items() if v is not None}

    tags = {"preset": config.preset, "init": "bert" if bert else "random"}
    return train_tracked("pretrain", config, payload, model, dataset, tokenizer, loss_fn, run_name="pretrain",
                         tags=tags, log_final_config=True)  # fmt: skip


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain as configured; resumes from ``output/checkpoints`` when a run was interrupted."""
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    captions = captions_uri(config)
    if not storage.exists(captions):
        raise StepError(f"no captions at {captions}: run `vilbert ingest` and `vilbert validate` first")
    spec, spec_hash = feature_spec_hash(config.features)
    model_config(config.preset, config.model_config_file)  # fail here, before any process starts
    payload = {
        "config": config,
        "captions": captions,
        "data_hash": sha256_of([captions]),
        "feature_spec": spec,
        "feature_spec_hash": spec_hash,
        "tracking_key": tracking_key(output, "pretrain"),
    }
    step = {
        "step": "pretrain",
        "task": None,
        "init": "bert" if resolve_text_init(config.text_init) else "random",
        "init_from": None if config.text_init == "none" else config.text_init,
        "preset": config.preset,
        "seed": config.trainer.seed,
        "dataset": config.dataset,
        "validation": config.validation,
        "features": config.features,
        "data_hash": payload["data_hash"],
        "feature_spec_hash": spec_hash,
        "max_text_length": config.data.max_text_length,
        "tracking_run_id": None,
        "config": config.to_dict(),
    }
    write_json(output / STEP_FILE, step)  # before training: a crashed run still says what it was
    out = run_on_processes(_worker, payload, config.nproc, config.max_restarts, log_dir=output / "logs")
    train = out["train"]
    metrics = train["metrics"]
    write_json(output / STEP_FILE, {**step, "tracking_run_id": out["tracking_run_id"]})
    write_json(output / RESULT_FILE, train)
    return PretrainResult(
        output=output,
        final_dir=Path(train["final_dir"]) if train["final_dir"] else None,
        steps=train["steps"],
        final_loss=train["final_loss"],
        metrics=metrics,
        samples_per_s=train["samples_per_s"],
        resumed_step=train["resumed_step"],
        tracking_run_id=out["tracking_run_id"],
    )
