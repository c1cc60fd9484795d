"""The evaluate step: a fine-tuned model (or, zero-shot, a pretrained one) on a task's test split.

Reads the model folder of ``finetune`` / ``pretrain`` (``step.json``, ``final/``, ``answer_vocab.json``), the
dataset root, the validation folder (rejected rows are dropped) and the feature store named in ``step.json``
unless given, and writes (``components/DATA_CONTRACTS.md``, "Step outputs around the trainer")::

    <output>/metrics.json        the task's metrics (official definitions, components.metrics), written last
    <output>/predictions.jsonl   one record per example: ids, prediction, target, score (+ per-example metric)
    <output>/pictures/*.png      retrieval examples, grounding boxes, co-attention maps, answer distributions

Everything is built in a staging folder first, then moved into place file by file (local: rename; ``s3://``:
one upload each), ``metrics.json`` last, so a failed run never replaces a good result with a partial one.  The
run is tracked in MLflow (metrics, the three outputs as artifacts, lineage tags from ``step.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from components import storage
from components.data.errors import DataError, EmptySplitError

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
PICTURES_DIR = "pictures"
STEP_FILE = "step.json"
_SPLIT = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate, on which data, and where the results go.  Built by :func:`components.config.load` in
    every engine (``vilbert evaluate --config params.yaml`` reads the ``evaluate`` section, as dvc.yaml does)."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("evaluate",)
    """The sections of params.yaml that ``--config params.yaml`` reads."""

    model: str
    """Model folder: a ``finetune`` output (``step.json`` + ``final/``), or with ``zero_shot`` a ``pretrain`` one."""
    output: str
    """Folder for metrics.json, predictions.jsonl and pictures/ (local or ``s3://``)."""
    dataset: str | None = None
    """Dataset root (local or ``s3://``); None: the ``dataset`` recorded in ``<model>/step.json``."""
    validation: str | None = None
    """Validation folder whose quarantined rows are dropped; None: ``step.json``'s ``config.validation``."""
    features: str | None = None
    """Feature store; None: ``step.json``'s ``features``.  Must match ``final/feature_spec.json``."""
    split: str = "test"
    """Split to evaluate (``test``, ``val``, or the task files' own split name)."""
    zero_shot: bool = False
    """Zero-shot caption-based image retrieval with the pretrained alignment head of a ``pretrain`` output."""
    batch_size: int = 32
    """Examples per forward pass (retrieval: gallery images per pass, one caption each)."""
    max_examples: int | None = None
    """Evaluate only the first N examples (retrieval: N captions against the whole gallery); for smoke runs."""
    pictures: int = 4
    """Examples per picture (0: no pictures)."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    threads: int | None = None
    """torch CPU threads during the step (None: leave torch's setting)."""
    workers: int = 0
    """DataLoader worker processes that build batches (0: in the main process)."""
    experiment: str = "vilbert"
    """MLflow experiment."""
    run_name: str | None = None
    """MLflow run name; None: ``evaluate-<task>`` or ``evaluate-zero-shot-retrieval``."""
    tracking: bool = True
    """Track the run in MLflow (False: no tracking at all)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: ``$MLFLOW_TRACKING_URI``, else the sqlite store in the project root."""
    parent_run_id: str | None = None
    """Nest the run under this pipeline run (None: ``$VILBERT_PARENT_RUN_ID`` when set)."""
    system_metrics: bool = True
    """Log MLflow system metrics (CPU, memory, GPU) during the run."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        for name in ("model", "output"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must be a non-empty path")
        if storage.is_s3(self.model):
            raise ValueError(f"model must be a local folder, got {self.model} (sync it down first)")
        if not storage.is_s3(self.output) and Path(self.output).resolve() == Path(self.model).resolve():
            raise ValueError("output must not be the model folder")
        if not _SPLIT.match(self.split):
            raise ValueError(f"split must be a split name like 'test' or 'val', got {self.split!r}")
        if self.batch_size < 1 or self.pictures < 0 or self.workers < 0:
            raise ValueError("need batch_size >= 1, pictures >= 0, workers >= 0")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or None, got {self.max_examples}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:<n> or mps, got {self.device!r}")


@dataclass
class EvaluateResult:
    """The step's outcome; the same numbers are in ``metrics.json``."""

    task: str
    """The evaluated task (``retrieval`` for zero-shot retrieval)."""
    split: str
    """The evaluated split."""
    metric: str
    """The task's headline metric name."""
    value: float
    """The headline metric (percent)."""
    metrics: dict[str, float]
    """Every metric (names and units: ``components.evaluation.scoring``)."""
    num_examples: int
    """Examples evaluated (retrieval: captions)."""
    zero_shot: bool
    """Zero-shot retrieval with the alignment head."""
    output: str
    """The output folder."""
    metrics_path: str
    """``<output>/metrics.json``."""
    predictions_path: str
    """``<output>/predictions.jsonl``."""
    pictures: list[str] = field(default_factory=list)
    """The pictures written (paths or URIs)."""
    tracking_run_id: str | None = None
    """The MLflow run, when tracked."""
    dataset_report: dict[str, Any] = field(default_factory=dict)
    """How the split's rows were used: ``rows = kept + dropped`` (rejected by validation, ...)."""
    seconds: float = 0.0
    """Wall time of the step."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelFolder:
    """A ``pretrain`` / ``finetune`` output folder, checked."""

    root: Path
    step: dict[str, Any]
    final: Path

    @classmethod
    def read(cls, path: str | Path) -> ModelFolder:
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"model folder {root} does not exist (pass the --output folder of finetune / pretrain)")
        step_path = root / STEP_FILE
        try:
            step = json.loads(step_path.read_text())
        except FileNotFoundError:
            raise DataError(f"{step_path} is missing: {root} is not a finetune / pretrain output folder") from None
        except ValueError as exc:
            raise DataError(f"{step_path} is not valid JSON ({exc})") from None
        if not isinstance(step, dict) or step.get("step") not in ("pretrain", "finetune"):
            raise DataError(f"{step_path} does not describe a pretrain or finetune output (its 'step' field)")
        final = root / "final"
        if not (final / "config.json").is_file() or not (final / "model.safetensors").is_file():
            raise DataError(f"{final} holds no checkpoint (config.json + model.safetensors): did the training "
                            "finish? Resume it, or evaluate a finished run")  # fmt: skip
        return cls(root, step, final)

    def setting(self, name: str) -> Any:
        """A value of ``step.json``, at the top level or in its resolved ``config``."""
        if self.step.get(name) is not None:
            return self.step[name]
        config = self.step.get("config")
        return config.get(name) if isinstance(config, dict) else None


def _task_of(folder: ModelFolder, zero_shot: bool) -> str:
    from components.data.tasks import TASKS, ZERO_SHOT_TASK

    if zero_shot:
        return ZERO_SHOT_TASK
    task = folder.step.get("task")
    if folder.step.get("step") == "pretrain" or task is None:
        raise DataError(f"{folder.root} is a pretraining output without a task head: fine-tune it first, or "
                        "evaluate zero-shot retrieval with zero_shot=True (--zero-shot)")  # fmt: skip
    if task not in TASKS:
        raise DataError(f"{folder.root / STEP_FILE} names an unknown task {task!r}; known: {sorted(TASKS)}")
    return task


def _resolve(config: EvaluateConfig, folder: ModelFolder) -> dict[str, Any]:
    """Dataset, validation and feature store URIs: the config's, else those recorded in ``step.json``."""
    chosen = {
        "dataset": config.dataset or folder.setting("dataset"),
        "validation": config.validation or folder.setting("validation"),
        "features": config.features or folder.setting("features"),
    }
    for name in ("dataset", "features"):
        if not chosen[name]:
            raise DataError(f"no {name} given and none recorded in {folder.root / STEP_FILE}: pass --{name}")
    return chosen


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_spec(store: Any, final: Path) -> None:
    """The store must hold the features the model was trained on: the same spec as ``final/feature_spec.json``."""
    from model.checkpoint import read_feature_spec

    trained = read_feature_spec(final)
    if trained is None:
        raise DataError(f"{final}/feature_spec.json is missing: cannot tell which features the model was trained on")
    have = store.spec.to_dict()
    diffs = [f"{k}: model {trained.get(k)!r} vs store {v!r}" for k, v in have.items() if trained.get(k) != v]
    if diffs:
        from components.features import FeatureSpecMismatch

        raise FeatureSpecMismatch(f"the feature store {store.root} was not made like the model's training features "
                                  f"({'; '.join(diffs)}); use the store the model was trained on (step.json "
                                  "'features'), or extract features with the same backend")  # fmt: skip


def _load(config: EvaluateConfig, folder: ModelFolder, task: str, uris: dict[str, Any],
          blind: bool) -> tuple[Any, Any]:  # fmt: skip
    """``(model, data)``: the checkpoint, and the split's dataset or retrieval gallery (``blind``: seen as the
    task's blind baseline was trained)."""
    from components.data.regions import DEFAULT_MAX_REGIONS, RegionSource
    from components.data.tasks import TASKS
    from components.evaluation.data import evaluation_data
    from components.features import FeatureStore
    from model.checkpoint import load_checkpoint, read_header
    from model.tokenizer import load_tokenizer

    header = read_header(folder.final)
    if header["kind"] == "pretraining":  # zero-shot: the pretraining heads live under ``pretraining.`` there
        model = load_checkpoint(folder.final, kind="tasks", num_answers=1)
    else:
        model = load_checkpoint(folder.final)
    store = FeatureStore.open(uris["features"])
    _check_spec(store, folder.final)
    regions = RegionSource(store, model.config, max_regions=int(folder.setting("max_regions") or DEFAULT_MAX_REGIONS),
                           blind=TASKS[task].blind if blind else None)  # fmt: skip
    tokenizer = load_tokenizer(folder.final)
    vocab = None
    if TASKS[task].answer_vocab:
        from components.data.tasks.vqa import ANSWER_VOCAB_FILE, AnswerVocab

        path = folder.root / ANSWER_VOCAB_FILE
        if not path.is_file():
            raise DataError(f"{path} is missing: a VQA model needs the answer vocabulary its head was trained on")
        vocab = AnswerVocab.load(path)
        head = int(model.answer.out.bias.shape[0])  # type: ignore[union-attr,index]  # a tasks checkpoint
        if len(vocab) != head:
            raise DataError(f"{path} has {len(vocab)} answers but the model's head {head}")
    try:
        data = evaluation_data(task, uris["dataset"], uris["validation"], regions, tokenizer, config.split,
                          folder.setting("max_text_length"), vocab)  # fmt: skip
    except EmptySplitError as exc:
        raise EmptySplitError(f"{exc} in {uris['dataset']} (validation: {uris['validation']}); choose another "
                              "split (--split)") from exc  # fmt: skip
    return model, data


def _checkpoint_hash(final: Path) -> str:
    digest = hashlib.sha256()
    with open(final / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate ``config.model`` on ``config.split``; writes metrics.json, predictions.jsonl and pictures/."""
    import torch

    from components.evaluation import HEADLINE, mlflow_metric_name, predict, score_details
    from components.evaluation.visuals import DatasetImages, make_pictures
    from components.tracking import Tracker, TrackingConfig

    started = time.time()
    folder = ModelFolder.read(config.model)
    task = _task_of(folder, config.zero_shot)
    uris = _resolve(config, folder)
    blind = bool(folder.setting("blind")) and not config.zero_shot  # a blind baseline's finetune records it
    device = _device(config.device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    local_out = not storage.is_s3(config.output)
    if local_out:  # staged inside the output folder, so publishing is a rename on the same file system
        staging = Path(config.output) / f".evaluate-{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir(parents=True)
    else:
        staging = Path(tempfile.mkdtemp(prefix="vilbert-evaluate-"))
    try:
        model, data = _load(config, folder, task, uris, blind)
        model.to(device)
        run_name = config.run_name or ("evaluate-zero-shot-retrieval" if config.zero_shot else f"evaluate-{task}")
        step = folder.step
        tracking = TrackingConfig(
            config.experiment, run_name, output_dir=Path(config.output) if local_out else staging,
            tracking_uri=config.tracking_uri, parent_run_id=config.parent_run_id, enabled=config.tracking,
            system_metrics=config.system_metrics,
            tags={"task": task, "split": config.split, "init": str(step.get("init")), "seed": str(step.get("seed")),
                  "zero_shot": str(config.zero_shot).lower(), "blind": str(blind).lower(),
                  "step": "evaluate"},
        )  # fmt: skip
        with Tracker(tracking) as tracker:
            tracker.log_config({**dataclasses.asdict(config), "resolved": {**uris, "task": task, "device": str(device),
                                "max_text_length": folder.setting("max_text_length")}})  # fmt: skip
            tracker.log_lineage(data_hash=step.get("data_hash"), feature_spec_hash=step.get("feature_spec_hash"),
                                checkpoint_hash=_checkpoint_hash(folder.final), model=str(folder.root.resolve()))  # fmt: skip
            predictions = predict(model, task, data, config.batch_size, device, zero_shot=config.zero_shot,
                                  max_examples=config.max_examples, workers=config.workers, progress=config.progress)  # fmt: skip
            metrics, details = score_details(predictions)
            for record, extra in zip(predictions.records, details, strict=True):
                record.update(extra)
            drawn = make_pictures(predictions, data, model, DatasetImages(uris["dataset"]), staging / PICTURES_DIR,
                                  config.pictures, device)  # fmt: skip
            headline = HEADLINE[task]
            summary = {
                "task": task, "split": config.split, "metric": headline, "value": metrics[headline],
                "metrics": metrics, "num_examples": len(predictions), "init": step.get("init"),
                "seed": step.get("seed"), "model": str(config.model), "zero_shot": config.zero_shot,
                "blind": blind,
                "tracking_run_id": tracker.run_id, "dataset": uris["dataset"], "validation": uris["validation"],
                "features": uris["features"], "dataset_report": data.report.to_dict(),
                "max_examples": config.max_examples, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.time() - started, 3),
            }  # fmt: skip
            lines = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in predictions.records)
            storage.atomic_write_local(staging / PREDICTIONS_FILE, lambda fh: fh.write(lines.encode("utf-8")))
            text = json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
            storage.atomic_write_local(staging / METRICS_FILE, lambda fh: fh.write(text.encode("utf-8")))
            tracker.log_metrics({mlflow_metric_name(k): v for k, v in metrics.items()})
            tracker.log_metrics({"num_examples": float(len(predictions))})
            tracker.log_artifact(staging / METRICS_FILE)
            tracker.log_artifact(staging / PREDICTIONS_FILE)
            if drawn:
                tracker.log_artifact(staging / PICTURES_DIR, PICTURES_DIR)
            published = _publish(staging, config.output, [p.relative_to(staging).as_posix() for p in drawn])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(threads)
    return EvaluateResult(
        task=task, split=config.split, metric=headline, value=metrics[headline], metrics=metrics,
        num_examples=len(predictions), zero_shot=config.zero_shot, output=str(config.output),
        metrics_path=storage.join(config.output, METRICS_FILE),
        predictions_path=storage.join(config.output, PREDICTIONS_FILE), pictures=published,
        tracking_run_id=tracker.run_id, dataset_report=data.report.to_dict(), seconds=time.time() - started,
    )  # fmt: skip


def _publish(staging: Path, output: str, pictures: list[str]) -> list[str]:
    """Move the staged files into ``output``, pictures first and ``metrics.json`` last; then drop pictures of an
    earlier run that this run did not draw.  Returns the pictures' final paths / URIs."""
    order = [*pictures, PREDICTIONS_FILE]
    if (staging / "tracking_fallback.jsonl").exists():  # s3 output: the tracker's offline log travels along
        order.append("tracking_fallback.jsonl")
    order.append(METRICS_FILE)
    for rel in order:
        if storage.is_s3(output):
            storage.upload_file(staging / rel, storage.join(output, rel))
        else:
            target = Path(output) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)  # same file system: an atomic rename
    keep = set(pictures)
    stale = [p for p in storage.list_files(storage.join(output, PICTURES_DIR))
             if f"{PICTURES_DIR}/{p}" not in keep and p.endswith(".png")]  # fmt: skip
    for rel in stale:
        storage.delete(storage.join(output, PICTURES_DIR, rel))
    return [storage.join(output, rel) for rel in pictures]
