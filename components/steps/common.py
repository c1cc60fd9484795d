"""What the steps share: :class:`StepError` and :class:`TrackingOptions` (``table`` too), and for the training
steps (``pretrain``, ``finetune``) the model's text side (tokenizer, BERT init), content hashes for lineage, the
step record ``step.json``, and running a worker function on N processes.

The step record and the output layout are specified in DATA_CONTRACTS.md ("Step outputs around the trainer").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import storage

log = logging.getLogger(__name__)

STEP_FILE = "step.json"
RESULT_FILE = "result.json"
MINILM = "minilm"
NONE = "none"


class StepError(ValueError):
    """A step's inputs or settings are unusable; the message says which and what to do."""


@dataclass(frozen=True)
class TrackingOptions:
    """How a step records itself in MLflow (see components/tracking.py)."""

    experiment: str = "vilbert"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (default: the step's name, e.g. ``pretrain`` or ``finetune-vqa``)."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI``, else sqlite ``mlflow.db`` in the project root)."""
    enabled: bool = True
    """False: record nothing in MLflow."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra run tags."""


def resolve_text_init(text_init: str) -> Path | None:
    """The BERT folder for the text stream: ``minilm`` (the bundled MiniLM-L6), a folder, or ``none``."""
    if text_init == NONE:
        return None
    if text_init == MINILM:
        from model.tokenizer import minilm_dir

        return minilm_dir()
    path = Path(text_init)
    if not path.is_dir():
        raise StepError(f"text_init {text_init!r} is not a folder (use 'minilm', 'none' or a BERT checkpoint folder)")
    return path


def resolve_tokenizer(tokenizer: str | None, text_init: str) -> Any:
    """A WordPiece tokenizer: ``tokenizer`` (``minilm`` or a folder) or, by default, the text-init folder's."""
    from model.tokenizer import load_tokenizer, minilm_dir

    if tokenizer is None:
        folder = resolve_text_init(text_init)
        if folder is None:
            raise StepError("text_init is 'none': name a tokenizer folder (tokenizer=...)")
        return load_tokenizer(folder)
    if tokenizer == MINILM:
        return load_tokenizer(minilm_dir())
    if not Path(tokenizer).is_dir():
        raise StepError(f"tokenizer {tokenizer!r} is not a folder with tokenizer files (or 'minilm')")
    return load_tokenizer(tokenizer)


def model_config(preset_name: str, config_file: str | None = None) -> Any:
    """A ViLBertConfig from a preset name or a JSON file (ours or the official format)."""
    from model import ViLBertConfig, preset

    if config_file:
        try:
            return ViLBertConfig.from_json(config_file)
        except Exception as exc:
            raise StepError(f"cannot read the model config {config_file}: {exc}") from exc
    return preset(preset_name)


def sha256_of(uris: Iterable[str]) -> str:
    """One sha256 over the bytes of several files (local or s3://), in the given order; missing files count
    as absent (their name is still hashed)."""
    digest = hashlib.sha256()
    for uri in uris:
        digest.update(str(uri).rsplit("/", 1)[-1].encode() + b"\0")
        if storage.exists(uri):
            digest.update(hashlib.sha256(storage.read_bytes(uri)).digest())
        else:
            digest.update(b"<absent>")
    return digest.hexdigest()


def feature_spec_hash(features: str) -> tuple[dict[str, Any], str]:
    """The store's spec (as a dict) and its sha256 (of the canonical spec.json)."""
    from components.features.store import read_spec

    if storage.is_s3(features):
        from components.features.spec import FeatureSpec

        spec = FeatureSpec.from_dict(json.loads(storage.read_bytes(storage.join(features, "spec.json"))))
    else:
        if not Path(features, "spec.json").exists():
            raise StepError(f"{features} is not a feature store (spec.json is missing): run `vilbert features` first")
        spec = read_spec(Path(features))
    return spec.to_dict(), spec.sha256()


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """A JSON file written atomically (temporary file, fsync, rename)."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    storage.atomic_write_local(Path(path), lambda f: f.write(text.encode()))


def read_step(folder: str | Path) -> dict[str, Any]:
    """``<folder>/step.json`` of a pretrain / finetune output."""
    path = Path(folder) / STEP_FILE
    if not path.exists():
        raise StepError(f"{folder} is not a pretrain / finetune output: {STEP_FILE} is missing")
    return json.loads(path.read_text())


def checkpoint_folder(init: str | Path) -> Path:
    """A native checkpoint folder from a step output (its ``final/``) or the checkpoint folder itself."""
    path = Path(init)
    if (path / "final" / "config.json").exists():
        return path / "final"
    if (path / "config.json").exists():
        return path
    raise StepError(
        f"{init} holds no checkpoint: expected a pretrain / finetune output folder (with final/) or a native "
        "checkpoint folder (with config.json)"
    )


TRACKING_KEY_FILE = ".tracking_key"


def tracking_key(output: Path, step: str) -> str:
    """The MLflow resume key of this run: the previous key when ``output`` holds a checkpoint to resume from
    (a resumed run continues its MLflow run), else a new one (a fresh run never reuses an old run's record)."""
    import uuid

    from components.training import checkpointing as ckpt

    path = output / TRACKING_KEY_FILE
    resumable = bool(ckpt.list_checkpoints(output / "checkpoints")) if (output / "checkpoints").exists() else False
    if resumable and path.exists():
        return path.read_text().strip()
    key = f"{step}:{uuid.uuid4().hex}"
    write_json_text(path, key)
    return key


def write_json_text(path: Path, text: str) -> None:
    storage.atomic_write_local(Path(path), lambda f: f.write(text.encode()))


def train_tracked(
    step: str,
    config: Any,
    payload: Mapping[str, Any],
    model: Any,
    dataset: Any,
    tokenizer: Any,
    loss_fn: Callable[..., Any],
    *,
    run_name: str,
    tags: Mapping[str, str],
    lineage_tags: Mapping[str, str] | None = None,
    log_final_config: bool = False,
) -> dict[str, Any]:
    """One rank's training run of a step, recorded in MLflow from rank 0: the step config (``config.trainer``,
    ``config.tracking``, ``config.output``, ``config.to_dict()``), the dataset report, lineage, the trainer's
    metrics.  ``payload`` carries what ``run_*`` computed once: tracking_key, data / feature-spec hashes, the
    feature spec.  Returns ``{"train": TrainResult.to_dict(), "tracking_run_id"}``."""
    from components.data.collate import Collator
    from components.data.sampler import ResumableDistributedSampler
    from components.tracking import Tracker, TrackingConfig
    from components.training import Trainer
    from components.training.distributed import dist_info_from_env

    info = dist_info_from_env()
    tracking = TrackingConfig(
        experiment=config.tracking.experiment,
        run_name=config.tracking.run_name or run_name,
        output_dir=config.output,
        tracking_uri=config.tracking.tracking_uri,
        tags={"step": step, **tags, **config.tracking.tags},
        resume_key=payload["tracking_key"],
        enabled=config.tracking.enabled,
    )
    with Tracker(tracking, rank=info.rank) as tracker:
        if info.is_main:
            tracker.log_config(config.to_dict(), name=f"{step}_config.json")
            tracker.log_params(config.to_dict())
            tracker.log_params(dataset.report.to_dict(), prefix="data")
            tracker.log_lineage(data_hash=payload["data_hash"], feature_spec_hash=payload["feature_spec_hash"])
            if lineage_tags:
                tracker.set_tags(dict(lineage_tags))
        trainer = Trainer(
            config.trainer,
            model,
            dataset,
            Collator(pad_token_id=tokenizer.pad_token_id),
            loss_fn,
            sampler=ResumableDistributedSampler(dataset, seed=config.trainer.seed, drop_last=True),
            tracker=tracker if info.is_main else None,
            tokenizer=tokenizer,
            feature_spec=payload["feature_spec"],
            data_hash=payload["data_hash"],
            feature_spec_hash=payload["feature_spec_hash"],
        )
        result = trainer.train()
        if info.is_main:
            tracker.log_metrics({"final/loss": result.final_loss, "final/samples_per_s": result.samples_per_s})
            if log_final_config and result.final_dir is not None:
                tracker.log_artifact(result.final_dir / "config.json", artifact_path="final")
        return {"train": result.to_dict(), "tracking_run_id": tracker.run_id}


def run_on_processes(
    worker: Callable[[dict[str, Any]], dict[str, Any]],
    payload: dict[str, Any],
    nproc: int,
    max_restarts: int,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """``worker(payload)`` in this process (nproc 1, or already under torchrun), else on ``nproc`` local workers
    under torchrun's elastic agent with restarts; returns rank 0's result."""
    from components.training.distributed import under_torchrun
    from components.training.launch import launch

    if nproc < 1:
        raise StepError(f"nproc must be >= 1, got {nproc}")
    if nproc == 1 or under_torchrun():
        return worker(payload)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    results = launch(worker, (payload,), nproc=nproc, max_restarts=max_restarts, threads_per_proc=threads,
                     log_dir=log_dir)  # fmt: skip
    return results[0]
