"""Fine-tuning datasets, one module per task, each reading the task's native files plus the feature store.

``TASKS[name]`` says which heads a task runs and how its loss comes from a collated batch::

    spec = TASKS["vqa"]
    out = model(**model_inputs(batch), heads=spec.heads)
    loss = spec.loss(out, batch)
"""

from components.data.tasks.common import TaskFiles, TaskSpec
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

__all__ = [
    "TASKS",
    "AnswerVocab",
    "RefCOCODataConfig",
    "RefCOCODataset",
    "RetrievalDataConfig",
    "RetrievalGallery",
    "RetrievalTrainDataset",
    "TaskFiles",
    "TaskSpec",
    "VCRDataConfig",
    "VCRDataset",
    "VQADataConfig",
    "VQADataset",
]
