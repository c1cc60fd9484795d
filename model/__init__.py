"""ViLBERT in plain PyTorch: config, network, heads, losses, checkpoint adapters.

Single-device code with no MLOps imports; distribution, mixed precision and compilation are applied
from outside.
"""

from .config import CoAttentionConfig, ConfigError, TextConfig, ViLBertConfig, VisionConfig, preset
from .heads import PretrainingOutput, TaskOutput, ViLBertForPretraining, ViLBertForTasks
from .vilbert import InputError, ViLBertModel, ViLBertOutput

__all__ = [
    "CoAttentionConfig",
    "ConfigError",
    "InputError",
    "PretrainingOutput",
    "TaskOutput",
    "TextConfig",
    "ViLBertConfig",
    "ViLBertForPretraining",
    "ViLBertForTasks",
    "ViLBertModel",
    "ViLBertOutput",
    "VisionConfig",
    "preset",
]
