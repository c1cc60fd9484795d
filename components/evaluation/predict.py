"""The model's predictions on a task's evaluation data, as plain per-example records.

:func:`predict` runs a ``ViLBertForTasks`` over a dataset (VQA, VCR, RefCOCO+) or a retrieval gallery and
returns :class:`Predictions`: one JSON-able record per example, in the data's order, with the task's ids, the
``prediction``, the ``target`` and the model's ``score`` for its prediction (what ``predictions.jsonl`` holds),
plus the retrieval score matrix.  No files, no tracking: the fine-tuning step calls it for its validation metric,
the evaluate step for the test split.

What each task predicts (the choice rules are those the benchmarks score):

* ``vqa``: the answer of the highest answer logit; score = its sigmoid (the head is trained with soft BCE).
* ``vcr``: the answer choice of the highest pair logit (``components.metrics.vcr.vcr_predictions``: ties go to
  the lowest index); score = its softmax probability over the four choices.
* ``refcoco+``: the highest-scoring real region other than region 0 (the whole image is never an answer, as
  ``components.data.tasks.refcoco.grounding_hits``), its pixel box; score = its softmax over those regions.
* ``retrieval``: every caption against every image of the gallery: the pair logit, or with ``zero_shot`` the
  pretrained alignment head's match probability (``pair_scores``); prediction = the best image.

Each task's rule is its ``TaskSpec.predict`` (``components/data/tasks/``); this module runs it.
"""

from __future__ import annotations

from typing import Any

import torch

from components.data.tasks import PredictionRun, Predictions, RetrievalGallery, task_spec
from components.data.tasks.refcoco import chosen_regions
from components.data.tasks.retrieval import TOP_K

__all__ = ["TOP_K", "Predictions", "chosen_regions", "predict"]


def predict(
    model: torch.nn.Module,
    task: str,
    data: Any,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    *,
    zero_shot: bool = False,
    max_examples: int | None = None,
    workers: int = 0,
    progress: bool = False,
) -> Predictions:
    """Predictions of ``model`` (a ``ViLBertForTasks``, already on its device) for every example of ``data``.

    ``data``: the task's dataset (``VQADataset``, ``VCRDataset``, ``RefCOCODataset``) or, for ``retrieval``, a
    ``RetrievalGallery``.  ``batch_size``: items per batch (retrieval: images per batch, one caption each).
    ``device``: where batches go (default: the model's device).  ``max_examples``: only the first N examples
    (retrieval: the first N captions, still against every image).  ``workers``: DataLoader worker processes.
    The model runs in eval mode without gradients; its train/eval mode is restored afterwards.
    """
    spec = task_spec(task)
    if zero_shot and not spec.zero_shot:
        raise ValueError(
            "zero_shot applies to retrieval only (the pretrained alignment head scores caption-image pairs)"
        )
    if batch_size < 1 or workers < 0 or (max_examples is not None and max_examples < 1):
        raise ValueError(f"need batch_size >= 1, workers >= 0, max_examples >= 1 or None; got {batch_size}, "
                         f"{workers}, {max_examples}")  # fmt: skip
    if spec.gallery != isinstance(data, RetrievalGallery):
        raise TypeError(f"task {task!r} needs {'a RetrievalGallery' if spec.gallery else 'its dataset'}, "
                        f"got {type(data).__name__}")  # fmt: skip
    target = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            heads = ("alignment",) if zero_shot else spec.heads
            run = PredictionRun(model, data, batch_size, target, max_examples, workers, progress, heads, zero_shot)
            return spec.predict(run)
    finally:
        model.train(was_training)
