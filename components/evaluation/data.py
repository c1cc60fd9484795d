"""A task's evaluation data: the split's dataset (or retrieval gallery), checked to be scorable before the model runs."""

from __future__ import annotations

from typing import Any

from components.data.common import DataError
from components.data.regions import RegionSource
from components.data.tasks import (
    AnswerVocab,
    RefCOCODataConfig,
    RefCOCODataset,
    RetrievalDataConfig,
    RetrievalGallery,
    TaskFiles,
    VCRDataConfig,
    VCRDataset,
    VQADataConfig,
    VQADataset,
)
from components.data.tasks.vcr import NUM_CHOICES


def evaluation_data(
    task: str,
    dataset: str,
    validation: str | None,
    regions: RegionSource,
    tokenizer: Any,
    split: str,
    max_text_length: int | None = None,
    vocab: AnswerVocab | None = None,
) -> Any:
    """The ``split`` of ``task`` from the dataset root ``dataset`` (rows quarantined in ``validation`` dropped).

    ``max_text_length``: the length the model was trained with (None: the task's default).  VQA needs ``vocab``.
    Raises :class:`DataError` when the split cannot be scored: VQA without an annotation file, VCR rows without
    ``answer_label`` (and ``EmptySplitError`` / ``MissingFeaturesError`` from the datasets)."""
    files = TaskFiles(dataset, validation)
    length: dict[str, Any] = {} if max_text_length is None else {"max_text_length": int(max_text_length)}
    if task == "vqa":
        if vocab is None:
            raise ValueError("VQA evaluation needs the answer vocabulary")
        vqa = VQADataset(files, regions, tokenizer, vocab, VQADataConfig(split=split, **length))
        if not vqa.annotated:
            raise DataError(f"VQA split {split!r} of {dataset} has no annotation file: accuracy cannot be computed "
                            "(VQA's test-dev answers are scored by the official server)")  # fmt: skip
        return vqa
    if task == "vcr":
        vcr = VCRDataset(files, regions, tokenizer, VCRDataConfig(split=split, **length))
        unlabelled = [it["row_id"] for it in vcr.items if not _label_ok(it["row"].get("answer_label"))]
        if unlabelled:
            raise DataError(f"{len(unlabelled)} VCR rows of split {split!r} have no valid answer_label "
                            f"(e.g. {unlabelled[:5]}): Q->A accuracy cannot be computed")  # fmt: skip
        return vcr
    if task == "refcoco+":
        return RefCOCODataset(files, regions, tokenizer, RefCOCODataConfig(split=split, **length))
    if task == "retrieval":
        return RetrievalGallery(files, regions, tokenizer, RetrievalDataConfig(split=split, **length))
    raise ValueError(f"unknown task {task!r}")


def _label_ok(label: Any) -> bool:
    return isinstance(label, int) and not isinstance(label, bool) and 0 <= label < NUM_CHOICES
