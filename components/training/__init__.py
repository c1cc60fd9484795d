"""Training: one trainer for pretraining and fine-tuning, exact-resume checkpoints, torchrun launching.

The names below load on first use, so that ``components.training.config`` (read by every command line to build
its options) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "checkpointing",
    "CorruptCheckpoint": "checkpointing",
    "ResumeMismatch": "checkpointing",
    "TrainerConfig": "config",
    "TrainerConfigError": "config",
    "TrainResult": "config",
    "LaunchError": "launch",
    "launch": "launch",
    "ResumableSampler": "trainer",
    "Trainer": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
