"""Predictions -> the benchmarks' metrics, through the official metric functions of ``components.metrics``.

Metric names and units (what ``metrics.json`` and :func:`score` report):

* ``vqa``: ``vqa_accuracy`` and ``vqa_accuracy_<answer type>`` (``yes_no``, ``number``, ``other``): percent.
* ``vcr``: ``vcr_q2a_accuracy``: percent.
* ``refcoco+``: ``grounding_accuracy`` (IoU >= 0.5) and ``grounding_upper_bound`` (expressions where some
  proposal reaches IoU 0.5: the accuracy a perfect chooser would get): percent; ``mean_iou``: a fraction in
  [0, 1], like every IoU.
* ``retrieval``: image retrieval (caption -> image, the ViLBERT metric) ``recall@1``, ``recall@5``,
  ``recall@10`` (percent), ``median_rank``, ``mean_rank`` (ranks); text retrieval (image -> caption) the same
  with a ``text_`` prefix.

Every task also reports ``chance``: the headline metric of a uniformly random choice, in percent (VQA: a
uniformly random answer of the evaluated questions' human answers; VCR: 1 / 4; RefCOCO+: one of the
expression's candidate regions at random; retrieval: R@1 = 1 / gallery size), from ``components.metrics``.

MLflow refuses ``@`` in metric names: :func:`mlflow_metric_name` maps ``recall@1`` to ``recall_at_1``.
"""

from __future__ import annotations

import re
from typing import Any

from components.evaluation.predict import Predictions
from components.metrics import grounding_scores, retrieval_scores, vcr_scores, vqa_scores
from components.metrics.grounding import IOU_THRESHOLD

#: The headline metric of each task (percent).
HEADLINE = {"vqa": "vqa_accuracy", "vcr": "vcr_q2a_accuracy", "refcoco+": "grounding_accuracy", "retrieval": "recall@1"}


def _percent(fraction: float) -> float:
    return 100.0 * float(fraction)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "unknown"


def mlflow_metric_name(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / : space``): ``recall@1`` -> ``recall_at_1``."""
    return re.sub(r"[^\w.\- /:]", "_", name.replace("@", "_at_"))


def score(task: str, predictions: Predictions) -> dict[str, float]:
    """The task's metrics (names and units in the module docstring) from :func:`predict`'s output."""
    if predictions.task != task:
        raise ValueError(f"predictions are for task {predictions.task!r}, not {task!r}")
    return score_details(predictions)[0]


def score_details(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``(metrics, per-example fields)``: the metrics of :func:`score` and, for each record, what the metric
    functions say about it (VQA ``accuracy``, VCR / RefCOCO+ ``correct`` and ``iou``, retrieval ``rank``)."""
    if not predictions.records:
        raise ValueError("no predictions to score")
    scorer = {"vqa": _vqa, "vcr": _vcr, "refcoco+": _refcoco, "retrieval": _retrieval}.get(predictions.task)
    if scorer is None:
        raise ValueError(f"unknown task {predictions.task!r}")
    return scorer(predictions)


def _vqa(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    records = predictions.records
    unannotated = [r["question_id"] for r in records if not r.get("answers") or r.get("answer_type") is None]
    if unannotated:
        raise ValueError(
            f"{len(unannotated)} questions have no human answers (e.g. {unannotated[:5]}): VQA accuracy needs the "
            "split's annotation file"
        )
    entries = [{"question_id": r["question_id"], "answers": r["answers"], "answer_type": r["answer_type"],
                **({"question_type": r["question_type"]} if r.get("question_type") is not None else {})}
               for r in records]  # fmt: skip
    result = vqa_scores({r["question_id"]: r["prediction"] for r in records}, entries)
    metrics = {HEADLINE["vqa"]: _percent(result["accuracy"]), "chance": _percent(result["chance"])}
    for answer_type, value in result["per_answer_type"].items():
        metrics[f"vqa_accuracy_{_slug(answer_type)}"] = _percent(value)
    return metrics, [{"accuracy": result["per_question"][r["question_id"]]} for r in records]


def _vcr(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    records = predictions.records
    unlabelled = [r["annot_id"] for r in records if r.get("target") is None]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} VCR questions have no answer_label (e.g. {unlabelled[:5]})")
    result = vcr_scores([r["choice_scores"] for r in records], [r["target"] for r in records])
    metrics = {HEADLINE["vcr"]: _percent(result["accuracy"]), "chance": _percent(result["chance"])}
    return metrics, [{"correct": c} for c in result["correct"]]


def _refcoco(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    records = predictions.records
    # chance: one of the expression's candidate regions (region 0 excluded) at random, when predict recorded them
    regions = [r.get("num_candidates") for r in records]
    counts = [int(n) for n in regions if isinstance(n, int) and n > 0]
    result = grounding_scores(
        [r["prediction"] for r in records],
        [r["target"] for r in records],
        num_regions=counts if len(counts) == len(records) else None,
    )
    reachable = sum(r["best_iou"] >= IOU_THRESHOLD for r in records) / len(records)
    metrics = {
        HEADLINE["refcoco+"]: _percent(result["accuracy"]),
        "grounding_upper_bound": _percent(reachable),
        "mean_iou": float(result["mean_iou"]),
    }
    if result.get("chance") is not None:
        metrics["chance"] = _percent(result["chance"])
    return metrics, [{"iou": i, "correct": c} for i, c in zip(result["iou"], result["correct"], strict=True)]


def _retrieval(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    if predictions.scores is None:
        raise ValueError("retrieval predictions carry no score matrix")
    result = retrieval_scores(predictions.scores, predictions.caption_image)
    metrics: dict[str, float] = {"chance": _percent(result["chance"]["recall_at_1"])}
    for prefix, part in (("", result["image_retrieval"]), ("text_", result["text_retrieval"])):
        for key, value in part.items():
            if key.startswith("recall_at_"):
                metrics[f"{prefix}recall@{key.removeprefix('recall_at_')}"] = _percent(value)
            elif key in ("median_rank", "mean_rank"):
                metrics[f"{prefix}{key}"] = float(value)
    return metrics, [{"rank": rank} for rank in result["image_retrieval"]["ranks"]]
