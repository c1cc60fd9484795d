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

Each task's scorer is its ``TaskSpec.score`` (``components/data/tasks/``).  MLflow refuses ``@`` in metric names: :func:`mlflow_metric_name` maps ``recall@1`` to ``recall_at_1``.
"""

from __future__ import annotations

import re
from typing import Any

from components.data.tasks import TASKS, Predictions, task_spec

#: The headline metric of each task (percent).
HEADLINE = {name: spec.metric for name, spec in TASKS.items()}


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
    return task_spec(predictions.task).score(predictions)
