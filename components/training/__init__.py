"""Training: one trainer for pretraining and fine-tuning, exact-resume checkpoints, torchrun launching."""

from .checkpointing import CheckpointError, CorruptCheckpoint, ResumeMismatch
from .config import TrainerConfig, TrainerConfigError, TrainResult
from .launch import LaunchError, launch
from .trainer import ResumableSampler, Trainer

__all__ = [
    "CheckpointError",
    "CorruptCheckpoint",
    "LaunchError",
    "ResumableSampler",
    "ResumeMismatch",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainerConfigError",
    "launch",
]
