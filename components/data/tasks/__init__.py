"""The task registry: one module per fine-tuning task, each reading the task's native files plus the feature store
and defining the task's :class:`TaskSpec`.

``TASKS[name]`` is everything the steps do per task (no step dispatches on a task name): the heads and the loss
on a collated batch, the datasets, how predictions are made, scored and pictured, the registered model's name and
how it answers requests.  :data:`TASK_NAMES` is the one task list, in the paper's order::

    spec = TASKS["vqa"]
    out = model(**model_inputs(batch), heads=spec.heads)
    loss = spec.loss(out, batch)
"""

from components.data.tasks.common import PredictionRun, Predictions, ServingAdapter, TaskFiles, TaskSpec
from components.data.tasks.refcoco import REFCOCO_TASK, RefCOCODataConfig, RefCOCODataset
from components.data.tasks.retrieval import (
    RETRIEVAL_TASK,
    RetrievalDataConfig,
    RetrievalGallery,
    RetrievalTrainDataset,
)
from components.data.tasks.vcr import VCR_TASK, VCRDataConfig, VCRDataset
from components.data.tasks.vqa import VQA_TASK, AnswerVocab, VQADataConfig, VQADataset

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (VQA_TASK, VCR_TASK, REFCOCO_TASK, RETRIEVAL_TASK)}
#: The task names in the paper's order (the pipeline's fan-out and the table's columns).
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
#: The task a pretrained model is evaluated on zero-shot (its alignment head scores caption-image pairs).
ZERO_SHOT_TASK = next(name for name, spec in TASKS.items() if spec.zero_shot)


def task_spec(name: str) -> TaskSpec:
    """``TASKS[name]``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}") from None


__all__ = [
    "TASKS",
    "TASK_NAMES",
    "ZERO_SHOT_TASK",
    "AnswerVocab",
    "PredictionRun",
    "Predictions",
    "RefCOCODataConfig",
    "RefCOCODataset",
    "RetrievalDataConfig",
    "RetrievalGallery",
    "RetrievalTrainDataset",
    "ServingAdapter",
    "TaskFiles",
    "TaskSpec",
    "VCRDataConfig",
    "VCRDataset",
    "VQADataConfig",
    "VQADataset",
    "task_spec",
]
