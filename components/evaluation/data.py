"""A task's evaluation data: the split's dataset (or retrieval gallery), checked to be scorable before the model runs."""

from __future__ import annotations

from typing import Any

from components.data.regions import RegionSource
from components.data.tasks import AnswerVocab, TaskFiles, task_spec


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
    spec = task_spec(task)
    files = TaskFiles(dataset, validation)
    length: dict[str, Any] = {} if max_text_length is None else {"max_text_length": int(max_text_length)}
    return spec.evaluation_data(files, regions, tokenizer, split, length, vocab)
