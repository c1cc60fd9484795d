"""``vilbert finetune --task T``: transfer to VQA, VCR-style multiple choice, RefCOCO+ grounding or caption-based
image retrieval, from a pretrained checkpoint or from scratch (the paper's "no multimodal pretraining" ablation:
only the text stream starts from BERT).

Output: the trainer's layout plus ``step.json``, ``result.json`` and, for VQA, ``answer_vocab.json``
(DATA_CONTRACTS.md, "Step outputs around the trainer").  The checkpoint in ``final/`` is a ``tasks`` model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from components import storage
from components.config import to_mapping
from components.data import DEFAULT_MAX_REGIONS
from components.steps.common import (
    MINILM,
    RESULT_FILE,
    STEP_FILE,
    StepError,
    TrackingOptions,
    checkpoint_folder,
    feature_spec_hash,
    model_config,
    read_step,
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

SCRATCH = "scratch"
PRETRAINED = "pretrained"
VOCAB_FILE = "answer_vocab.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``vilbert finetune`` needs; ``trainer.output_dir`` is the step's output folder.

    Built by :func:`components.config.load` in every engine (command line, params.yaml sections ``model`` and
    ``finetune``, the Kubeflow op): its fields are the only declaration of the step's settings."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "finetune")
    """The sections of params.yaml that ``--config params.yaml`` reads, in order."""
    STEP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "trainer": {"batch_size": 32, "lr": 4e-5, "checkpoint_every": 200, "keep_last": 2}
    }
    """Fine-tuning's own trainer defaults (over TrainerConfig's)."""
    DEFAULT_EPOCHS: ClassVar[float] = 3.0
    """Passes over the task's training split when neither ``trainer.epochs`` nor ``trainer.max_steps`` is set."""
    VARIANTS: ClassVar[tuple[str, str]] = ("by_task", "task")
    """A settings layer may give one task its own settings under ``by_task.<task>`` (e.g. VQA's step budget)."""

    @classmethod
    def variant_values(cls) -> tuple[str, ...]:
        from components.data.tasks import TASK_NAMES

        return TASK_NAMES

    task: str
    """vqa, vcr, refcoco+ or retrieval."""
    dataset: str
    """Dataset root written by ``ingest`` (local or s3://)."""
    features: str
    """Feature store written by ``features``; must match the checkpoint's feature spec."""
    trainer: TrainerConfig
    """How to train; its ``output_dir`` is the step's output folder."""
    init: str = SCRATCH
    """``scratch``, ``pretrained`` (start from ``pretrained``), or a pretrain output / native checkpoint folder."""
    pretrained: str | None = None
    """The pretrain output folder that ``init="pretrained"`` starts from."""
    validation: str | None = None
    """Folder written by ``validate``: rows it rejected are left out."""
    preset: str = "demo"
    """scratch only: the model preset (a pretrained init brings its own config)."""
    model_config_file: str | None = None
    """scratch only: a model config JSON instead of the preset."""
    text_init: str = MINILM
    """scratch only: BERT weights of the text stream (``minilm``, a folder, or ``none``)."""
    tokenizer: str | None = None
    """Tokenizer folder or ``minilm``; default: the pretrained checkpoint's, else the text-init folder's."""
    split: str = "train"
    """Training split of the task's files."""
    max_text_length: int | None = None
    """Tokens per text; None: the original's length for the task (VQA 23, VCR 40, RefCOCO+ 20, retrieval 30)."""
    answer_min_count: int = 9
    """VQA: answers given at least this often in the training annotations form the answer vocabulary."""
    max_regions: int = DEFAULT_MAX_REGIONS
    """Regions per image including the whole-image token."""
    blind: bool = False
    """Train the task's blind baseline (scratch init only): the model sees no image features - nothing of the image
    for VQA, VCR and retrieval, only the region boxes for RefCOCO+ (``TaskSpec.blind``).  ``evaluate`` reads it from
    step.json and evaluates the same way; the table shows it as its own row."""
    head_lr_mult: float = 1.0
    """The task's own head (VQA ``answer``, VCR and retrieval ``pair``, RefCOCO+ ``region``) trains at
    ``trainer.lr`` times this; the trunk at ``trainer.lr``.  The head starts from random weights on top of pooled
    vectors of small magnitude: within a short budget it needs a larger step than the BERT-initialised trunk
    (the ``trainer.lr_multipliers`` this sets are recorded in step.json)."""
    nproc: int = 1
    """Processes on this machine (torchrun's elastic agent); ignored under an external torchrun."""
    max_restarts: int = 3
    """Whole-group restarts after a worker failure (each resumes from the last checkpoint)."""
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    """MLflow tracking."""

    def __post_init__(self) -> None:
        from components.data.tasks import TASK_NAMES, TASKS

        if self.task not in TASK_NAMES:
            raise StepError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_NAMES)}")
        if self.model_config_file is None:
            from model.config import PRESETS

            if self.preset not in PRESETS:
                raise StepError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.nproc < 1 or self.max_restarts < 0 or self.max_regions < 2 or self.answer_min_count < 1:
            raise StepError("need nproc >= 1, max_restarts >= 0, max_regions >= 2 and answer_min_count >= 1")
        if self.max_text_length is not None and self.max_text_length < 4:
            raise StepError(f"max_text_length must be >= 4, got {self.max_text_length}")
        if storage.is_s3(str(self.trainer.output_dir)):
            raise StepError("the output folder must be local (checkpoints are renamed atomically)")
        if not (self.head_lr_mult > 0 and math.isfinite(self.head_lr_mult)):
            raise StepError(f"head_lr_mult must be a positive number, got {self.head_lr_mult}")
        if self.head_lr_mult != 1.0:
            heads = tuple((f"{head}.", self.head_lr_mult) for head in TASKS[self.task].heads)
            if not self.trainer.lr_multipliers:
                object.__setattr__(self, "trainer", dataclasses.replace(self.trainer, lr_multipliers=heads))
            elif self.trainer.lr_multipliers != heads:  # the same ones (a config read back from step.json) are fine
                raise StepError(f"head_lr_mult {self.head_lr_mult:g} asks for lr_multipliers {list(heads)}, but the "
                                f"trainer config has {list(self.trainer.lr_multipliers)}: set one of them")  # fmt: skip
        if self.blind and self.init != SCRATCH:
            raise StepError("a blind baseline starts from scratch (init='scratch'): it must not see pretraining")
        if self.init == PRETRAINED and not self.pretrained:
            raise StepError("init 'pretrained' needs the pretrain output folder (pretrained=... / --pretrained)")

    @property
    def output(self) -> Path:
        return Path(self.trainer.output_dir)

    @property
    def init_path(self) -> str | None:
        """The folder the weights come from (None for scratch)."""
        if self.init == SCRATCH:
            return None
        return self.pretrained if self.init == PRETRAINED else self.init

    @property
    def text_length(self) -> int:
        from components.data.tasks import TASKS

        return self.max_text_length or TASKS[self.task].text_length

    @property
    def init_kind(self) -> str:
        return SCRATCH if self.init == SCRATCH else PRETRAINED

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


@dataclass
class FinetuneResult:
    """What ``run_finetune`` did."""

    task: str
    output: Path
    final_dir: Path | None
    steps: int
    final_loss: float
    metrics: dict[str, float]
    samples_per_s: float
    tracking_run_id: str | None


def build_task_dataset(task: str, files: Any, regions: Any, tokenizer: Any, split: str, text_length: int,
                       seed: int, vocab: Any = None) -> Any:  # fmt: skip
    """The task's dataset for ``split`` (the same builder serves training and evaluation)."""
    from components.data.tasks import TASKS

    return TASKS[task].dataset(files, regions, tokenizer, split, text_length, seed, vocab)


def _load_model(config: FinetuneConfig, num_answers: int, is_main: bool) -> tuple[Any, Any]:
    """(model, its config): the pretrained trunk and heads with fresh task heads, or scratch + BERT text stream."""
    from model import ViLBertForTasks
    from model.checkpoint import load_bert_text_stream, load_checkpoint

    if config.init_kind == "pretrained":
        folder = checkpoint_folder(str(config.init_path))
        model = load_checkpoint(folder, kind="tasks", num_answers=num_answers)
        return model, model.config
    mconfig = model_config(config.preset, config.model_config_file)
    model = ViLBertForTasks(mconfig, num_answers=num_answers)
    bert = resolve_text_init(config.text_init)
    if bert is not None:
        report = load_bert_text_stream(model, bert)
        if is_main:
            log.info("scratch model; text stream from %s (%d tensors)", bert, len(report.loaded))
    return model, mconfig


def _worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One rank's fine-tuning."""
    import torch

    from components.data.collate import model_inputs
    from components.data.regions import RegionSource
    from components.data.tasks import TASKS, AnswerVocab, TaskFiles
    from components.training.distributed import dist_info_from_env

    config: FinetuneConfig = payload["config"]
    info = dist_info_from_env()
    torch.manual_seed(config.trainer.seed)
    vocab = AnswerVocab.load(config.output / VOCAB_FILE) if TASKS[config.task].answer_vocab else None
    model, mconfig = _load_model(config, len(vocab) if vocab else 1, info.is_main)
    tokenizer = payload["tokenizer"]
    blind = TASKS[config.task].blind if config.blind else None
    regions = RegionSource(config.features, mconfig, max_regions=config.max_regions, blind=blind)
    files = TaskFiles(config.dataset, config.validation)
    dataset = build_task_dataset(config.task, files, regions, tokenizer, config.split, config.text_length,
                                 config.trainer.seed, vocab)  # fmt: skip
    spec = TASKS[config.task]

    def loss_fn(model, batch):
        out = model(**model_inputs(batch), heads=spec.heads)
        return spec.loss(out, batch), {}

    tags = {"task": config.task, "init": config.init_kind, "seed": str(config.trainer.seed),
            "blind": str(config.blind).lower()}  # fmt: skip
    return train_tracked("finetune", config, payload, model, dataset, tokenizer, loss_fn,
                         run_name=f"finetune-{config.task}-{'blind' if config.blind else config.init_kind}", tags=tags,
                         lineage_tags={"lineage.init_from": str(config.init_path)})  # fmt: skip


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as configured; resumes from ``output/checkpoints`` when a run was interrupted."""
    from components.data.tasks import TASKS, AnswerVocab, TaskFiles

    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    spec, spec_hash = feature_spec_hash(config.features)
    init_from = None
    if config.init_kind == "pretrained":
        init_from = checkpoint_folder(str(config.init_path))
        from model.checkpoint import read_feature_spec

        trained_on = read_feature_spec(init_from)
        if trained_on is not None and trained_on != spec:
            raise StepError(
                f"the feature store {config.features} does not match the features {init_from} was pretrained on "
                f"(store: backend {spec.get('backend')!r}, D={spec.get('feature_size')}, C={spec.get('num_classes')}; "
                f"checkpoint: backend {trained_on.get('backend')!r}, D={trained_on.get('feature_size')}, "
                f"C={trained_on.get('num_classes')})"
            )
        tokenizer = resolve_tokenizer(config.tokenizer or str(init_from), config.text_init)
    else:
        tokenizer = resolve_tokenizer(config.tokenizer, config.text_init)
    task = TASKS[config.task]
    uris = [storage.join(config.dataset, rel.format(split=config.split)) for rel in task.files]
    if config.validation:
        uris.append(storage.join(config.validation, "quarantine.parquet"))
    if not storage.exists(uris[0]):
        raise StepError(f"the {config.task} task has no {config.split} file {uris[0]}: was the dataset ingested?")
    data_hash = sha256_of(uris)
    if task.answer_vocab:
        vocab_path = output / VOCAB_FILE
        if not vocab_path.exists():  # a resumed run keeps its vocabulary (the head's answer order)
            files = TaskFiles(config.dataset, config.validation)
            vocab = AnswerVocab.from_task_files(files, split=config.split, min_count=config.answer_min_count)
            vocab.save(vocab_path)
            log.info("answer vocabulary: %d answers given at least %d times", len(vocab), config.answer_min_count)
    step = {
        "step": "finetune",
        "task": config.task,
        "init": config.init_kind,
        "init_from": str(init_from) if init_from else None,
        "preset": config.preset if init_from is None else read_step_preset(init_from),
        "seed": config.trainer.seed,
        "dataset": config.dataset,
        "validation": config.validation,
        "features": config.features,
        "data_hash": data_hash,
        "feature_spec_hash": spec_hash,
        "max_text_length": config.text_length,
        "tracking_run_id": None,
        "config": config.to_dict(),
    }
    write_json(output / STEP_FILE, step)
    payload = {"config": config, "tokenizer": tokenizer, "data_hash": data_hash, "feature_spec": spec,
               "feature_spec_hash": spec_hash, "tracking_key": tracking_key(output, "finetune")}  # fmt: skip
    out = run_on_processes(_worker, payload, config.nproc, config.max_restarts, log_dir=output / "logs")
    train = out["train"]
    write_json(output / STEP_FILE, {**step, "tracking_run_id": out["tracking_run_id"]})
    write_json(output / RESULT_FILE, train)
    return FinetuneResult(
        task=config.task,
        output=output,
        final_dir=Path(train["final_dir"]) if train["final_dir"] else None,
        steps=train["steps"],
        final_loss=train["final_loss"],
        metrics=train["metrics"],
        samples_per_s=train["samples_per_s"],
        tracking_run_id=out["tracking_run_id"],
    )


def read_step_preset(checkpoint: Path) -> str | None:
    """The preset named in the step.json next to a checkpoint's ``final/`` (None when unknown)."""
    try:
        return read_step(checkpoint.parent).get("preset")
    except StepError:
        return None
