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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from components.data.collate import Collator, model_inputs, to_device
from components.data.tasks import TASKS, RetrievalGallery
from components.data.tasks.retrieval import pair_scores
from components.data.tasks.vcr import multiple_choice_logits
from components.metrics.vcr import vcr_predictions

#: How many best images a retrieval record lists (``top_k``): enough for R@10 and for the pictures.
TOP_K = 10


@dataclass
class Predictions:
    """A task's predictions; ``records[i]`` belongs to example i of the data (dataset item / gallery caption)."""

    task: str
    """``vqa``, ``vcr``, ``refcoco+`` or ``retrieval``."""
    records: list[dict[str, Any]]
    """One JSON-able dict per example: ids, ``prediction``, ``target``, ``score`` and task-specific fields."""
    zero_shot: bool = False
    """Retrieval scored with the pretrained alignment head instead of a fine-tuned pair head."""
    scores: np.ndarray | None = None
    """Retrieval: the float32 (captions, images) score matrix over the full gallery; else None."""
    caption_image: list[int] = field(default_factory=list)
    """Retrieval: index into ``image_ids`` of each caption's image (the ground truth)."""
    image_ids: list[str] = field(default_factory=list)
    """Retrieval: the gallery's images, the columns of ``scores``."""

    def __len__(self) -> int:
        return len(self.records)


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
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if zero_shot and task != "retrieval":
        raise ValueError(
            "zero_shot applies to retrieval only (the pretrained alignment head scores caption-image pairs)"
        )
    if batch_size < 1 or workers < 0 or (max_examples is not None and max_examples < 1):
        raise ValueError(f"need batch_size >= 1, workers >= 0, max_examples >= 1 or None; got {batch_size}, "
                         f"{workers}, {max_examples}")  # fmt: skip
    if (task == "retrieval") != isinstance(data, RetrievalGallery):
        raise TypeError(f"task {task!r} needs {'a RetrievalGallery' if task == 'retrieval' else 'its dataset'}, "
                        f"got {type(data).__name__}")  # fmt: skip
    target = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if task == "retrieval":
                return _predict_retrieval(model, data, batch_size, target, zero_shot, max_examples, progress)
            run = _Run(model, data, batch_size, target, max_examples, workers, progress, TASKS[task].heads)
            return Predictions(task, {"vqa": _vqa, "vcr": _vcr, "refcoco+": _refcoco}[task](run))
    finally:
        model.train(was_training)


@dataclass
class _Run:
    """One pass of a model over the first ``limit`` items of a dataset."""

    model: torch.nn.Module
    dataset: Any
    batch_size: int
    device: torch.device
    limit: int | None
    workers: int
    progress: bool
    heads: tuple[str, ...]

    def batches(self) -> Iterator[tuple[range, dict[str, Any], Any]]:
        """``(dataset indices, batch, model output)`` per batch, in dataset order."""
        n = len(self.dataset) if self.limit is None else min(self.limit, len(self.dataset))
        loader = DataLoader(
            Subset(self.dataset, range(n)),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=Collator(pad_token_id=self.dataset.tokenizer.pad_token_id),
        )
        total = math.ceil(n / self.batch_size)
        for number, batch in enumerate(tqdm(loader, total=total, desc="evaluate", disable=not self.progress)):
            start = number * self.batch_size
            out = self.model(**model_inputs(to_device(batch, self.device)), heads=self.heads)
            yield range(start, min(start + self.batch_size, n)), batch, out


def _finite(values: Tensor, what: str) -> Tensor:
    """``values`` as float32 on the CPU; NaN or infinite scores mean a broken checkpoint: say so."""
    values = values.detach().float().cpu()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"the model produced NaN or infinite {what}; the checkpoint is broken (diverged training?)")
    return values


def _vqa(run: _Run) -> list[dict[str, Any]]:
    vocab, records = run.dataset.vocab, []
    for indices, _batch, out in run.batches():
        logits = _finite(out.answer_logits, "answer logits")  # (B, A)
        best = logits.argmax(-1)
        probs = torch.sigmoid(logits.gather(1, best[:, None]))[:, 0]
        for row, index in enumerate(indices):
            item = run.dataset.items[index]
            question, ann = item["question"], item["annotation"] or {}
            answers = [a["answer"] for a in ann.get("answers", []) if isinstance(a, dict) and "answer" in a]
            records.append({
                "question_id": question["question_id"],
                "image_id": item["image_id"],
                "question": question.get("question"),
                "prediction": vocab[int(best[row])],
                "target": ann.get("multiple_choice_answer"),
                "score": float(probs[row]),
                "answers": answers,
                "answer_type": ann.get("answer_type"),
                "question_type": ann.get("question_type"),
            })  # fmt: skip
    return records


def _vcr(run: _Run) -> list[dict[str, Any]]:
    records = []
    for indices, batch, out in run.batches():
        logits = _finite(multiple_choice_logits(out, batch), "pair logits")  # (B, 4)
        chosen = vcr_predictions(logits.numpy())
        probs = torch.softmax(logits, -1)
        for row, index in enumerate(indices):
            item = run.dataset.items[index]
            label = item["row"].get("answer_label")
            valid = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < logits.shape[1]
            records.append({
                "annot_id": item["row_id"],
                "image_id": item["image_id"],
                "question": item["row"].get("question"),
                "prediction": int(chosen[row]),
                "target": label if valid else None,
                "score": float(probs[row, chosen[row]]),
                "choice_scores": logits[row].tolist(),
            })  # fmt: skip
    return records


def chosen_regions(region_logits: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(chosen (B,), probability (B,))``: the best real region other than region 0 and its softmax over them."""
    logits = region_logits.squeeze(-1).detach().float().cpu()  # (B, N)
    allowed = region_mask.detach().cpu().bool().clone()
    allowed[:, 0] = False  # the whole-image token is never the answer
    masked = logits.masked_fill(~allowed, float("-inf"))
    chosen = masked.argmax(-1)
    return chosen, torch.softmax(masked, -1).gather(1, chosen[:, None])[:, 0]


def _refcoco(run: _Run) -> list[dict[str, Any]]:
    records = []
    for indices, batch, out in run.batches():
        logits = out.region_logits.detach()
        allowed = batch["region_mask"].bool()
        _finite(logits.squeeze(-1).cpu()[allowed], "region logits")
        chosen, probs = chosen_regions(logits, batch["region_mask"])
        meta = batch["meta"]
        for row, index in enumerate(indices):
            item = run.dataset.items[index]
            real = int(allowed[row].sum())
            records.append({
                "ref_id": item["ref_id"],
                "sent_id": item["sent_id"],
                "image_id": item["image_id"],
                "expression": item["text"],
                "prediction": meta["pixel_boxes"][row, int(chosen[row])].tolist(),
                "target": meta["target_box"][row].tolist(),
                "region": int(chosen[row]),
                "score": float(probs[row]),
                # the best IoU any proposal reaches: the accuracy a perfect chooser would get on this expression
                "best_iou": float(meta["region_iou"][row, 1:real].max()),
                "num_candidates": real - 1,  # the regions a choice is made among (region 0 excluded)
            })  # fmt: skip
    return records


def _predict_retrieval(
    model: torch.nn.Module,
    gallery: RetrievalGallery,
    batch_size: int,
    device: torch.device,
    zero_shot: bool,
    limit: int | None,
    progress: bool,
) -> Predictions:
    captions = len(gallery.captions) if limit is None else min(limit, len(gallery.captions))
    images = len(gallery.image_ids)
    scores = np.full((captions, images), np.nan, dtype=np.float32)
    heads = ("alignment",) if zero_shot else ("pair",)
    total = math.ceil(images / batch_size) * captions
    with tqdm(total=total, desc="evaluate retrieval", disable=not progress) as bar:
        for batch in gallery.batches(batch_size):
            caption, image = batch["meta"]["caption_index"], batch["meta"]["image_index"]
            if int(caption[0]) >= captions:  # smoke runs: the first captions only (every batch is one caption)
                continue
            out = model(**model_inputs(to_device(batch, device)), heads=heads)
            scores[caption.numpy(), image.numpy()] = _finite(pair_scores(out, zero_shot), "pair scores").numpy()
            bar.update(1)
    if np.isnan(scores).any():
        raise RuntimeError("the gallery did not score every caption-image pair")  # a bug, not bad input
    records = []
    for c in range(captions):
        order = np.argsort(-scores[c], kind="stable")[:TOP_K]
        truth = gallery.caption_image[c]
        records.append({
            "caption_index": c,
            "caption": gallery.captions[c],
            "image_id": gallery.image_ids[truth],
            "prediction": gallery.image_ids[int(order[0])],
            "target": gallery.image_ids[truth],
            "score": float(scores[c, order[0]]),
            "target_score": float(scores[c, truth]),
            "top_k": [gallery.image_ids[int(i)] for i in order],
            "top_k_scores": [float(scores[c, i]) for i in order],
        })  # fmt: skip
    return Predictions(
        "retrieval",
        records,
        zero_shot=zero_shot,
        scores=scores,
        caption_image=list(gallery.caption_image[:captions]),
        image_ids=list(gallery.image_ids),
    )
