"""Referring-expression grounding accuracy (RefCOCO+) as the original ViLBERT code computes it.

Followed: github.com/facebookresearch/vilbert-multi-task at commit ``f22b84a9918a9aea2106e14ac1f6b32ad71492e3``:
``vilbert/datasets/refer_expression_dataset.py`` (its ``iou`` and the ground-truth box it is given) and
``vilbert/task_utils.py`` (the ``V-logit`` evaluation: the region with the highest logit is chosen and counts as
correct when its IoU with the ground truth is ``> 0.5``).  Definition: Yu et al., "Modeling Context in
Referring Expressions", ECCV 2016; Lu et al., "ViLBERT", NeurIPS 2019, section 4.  Our code;
``tests/data/metrics/`` holds cases scored by the original ``iou`` (README there).

The ``"vilbert"`` convention (the default), exactly as the original:

- boxes are pixel ``x1, y1, x2, y2``; the ground truth is the refer annotation's ``[x, y, w, h]`` turned into
  ``[x, y, x + w, y + h]`` (:func:`xywh_to_xyxy`), NOT ``x + w - 1``;
- corners are inclusive pixels: a box is ``x2 - x1 + 1`` wide, the intersection ``min(x2) - max(x1) + 1``
  (clipped at 0), so boxes that only touch overlap by one pixel and a point box has area 1;
- the arithmetic is float32 in the original's order of operations (the original runs it on float32
  tensors), so the IoU we return is the original's float32 value, and borderline cases fall the same way;
- correct iff ``IoU > iou_threshold`` (strictly; 0.5 exactly is wrong).

The ``"continuous"`` convention is the COCO API / torchvision one (area ``(x2 - x1) * (y2 - y1)`` in float64,
zero-union pairs get IoU 0) with correct iff ``IoU >= iou_threshold``: what this module computed before, and
what ``components/data/tasks/refcoco.py`` uses for training targets.  The refer toolkit's own ``computeIoU``
(xywh, corners ``x + w - 1``) is a third convention, used by neither ViLBERT nor us.

Chance (``grounding_scores``'s ``chance`` key, a fraction like ``accuracy``): the expected accuracy of choosing
a candidate region uniformly at random -- with ``candidate_boxes``, the mean over expressions of the share of
its candidates that would count as correct; with only ``num_regions``, the mean of ``1 / num_regions`` (right
when exactly one candidate is correct); with neither, ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from components.metrics._arrays import as_array

#: RefCOCO+ counts a prediction as correct above this IoU (ViLBERT: strictly above; continuous: at least).
IOU_THRESHOLD = 0.5
#: How boxes are measured and the threshold applied (module docstring).
Convention = Literal["vilbert", "continuous"]
CONVENTIONS: tuple[str, ...] = ("vilbert", "continuous")


def _boxes(values: Any, name: str) -> np.ndarray:
    """``values`` as float64 [N, 4] pixel x1, y1, x2, y2 with x1 <= x2 and y1 <= y2."""
    array = as_array(values, name=name)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name}: expected boxes [N, 4] in pixel x1, y1, x2, y2, got shape {array.shape}")
    inverted = (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])
    if inverted.any():
        first = int(np.flatnonzero(inverted)[0])
        raise ValueError(f"{name}: box {first} has x2 < x1 or y2 < y1: {array[first].tolist()} (expected xyxy)")
    return array


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def xywh_to_xyxy(boxes: Any) -> np.ndarray:
    """COCO / refer boxes [x, y, w, h] (float64 [N, 4] or [4]) as [x1, y1, x2, y2] = [x, y, x + w, y + h]."""
    array = as_array(boxes, name="boxes")
    if array.shape[-1] != 4:
        raise ValueError(f"boxes: expected [..., 4] in x, y, w, h, got shape {array.shape}")
    return np.concatenate([array[..., :2], array[..., :2] + array[..., 2:]], axis=-1)


def _iou_inclusive_float32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    one = np.float32(1)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    inter_w = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + one, np.float32(0))
    inter_h = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + one, np.float32(0))
    inter = inter_w * inter_h
    return (inter / (area_a + area_b - inter)).astype(np.float64)


def _iou_continuous(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter_w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    inter_h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = inter_w * inter_h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    safe_union = np.where(union > 0, union, 1.0)
    return np.where(union > 0, inter / safe_union, 0.0)


def box_iou(boxes_a: Any, boxes_b: Any, *, convention: Convention = "vilbert") -> np.ndarray:
    """Element-wise IoU of two box lists [N, 4] (or single boxes [4]) in pixel xyxy: float64 [N] in [0, 1].

    ``convention``: ``"vilbert"`` (inclusive pixels, float32, the original's values) or ``"continuous"``
    (module docstring).
    """
    _check_convention(convention)
    a, b = _boxes(boxes_a, "boxes_a"), _boxes(boxes_b, "boxes_b")
    if a.shape != b.shape:
        raise ValueError(f"box_iou: pairs needed, got {a.shape[0]} and {b.shape[0]} boxes")
    return _iou_inclusive_float32(a, b) if convention == "vilbert" else _iou_continuous(a, b)


def is_correct(iou: Any, *, iou_threshold: float = IOU_THRESHOLD, convention: Convention = "vilbert") -> np.ndarray:
    """Whether each IoU counts as a hit: ``> iou_threshold`` (vilbert) or ``>= iou_threshold`` (continuous)."""
    _check_convention(convention)
    values = as_array(iou, name="iou")
    return values > iou_threshold if convention == "vilbert" else values >= iou_threshold


def _chance(
    true_boxes: np.ndarray,
    candidate_boxes: Sequence[Any] | None,
    num_regions: int | Sequence[int] | None,
    iou_threshold: float,
    convention: Convention,
) -> float | None:
    n = true_boxes.shape[0]
    if candidate_boxes is not None:
        if len(candidate_boxes) != n:
            raise ValueError(
                f"candidate_boxes: one set of boxes per expression ({n}) expected, got {len(candidate_boxes)}"
            )
        shares = []
        for i, candidates in enumerate(candidate_boxes):
            boxes = _boxes(candidates, f"candidate_boxes[{i}]")
            if boxes.shape[0] == 0:
                raise ValueError(f"candidate_boxes[{i}]: no candidates")
            truth = np.repeat(true_boxes[i : i + 1], boxes.shape[0], axis=0)
            iou = box_iou(boxes, truth, convention=convention)
            shares.append(float(is_correct(iou, iou_threshold=iou_threshold, convention=convention).mean()))
        return float(np.mean(shares))
    if num_regions is not None:
        counts = np.broadcast_to(as_array(num_regions, name="num_regions"), (n,))
        if np.any(counts < 1) or not np.all(counts == np.round(counts)):
            raise ValueError("num_regions: positive whole numbers expected")
        return float(np.mean(1.0 / counts))
    return None


def grounding_scores(
    pred_boxes: Any,
    true_boxes: Any,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    convention: Convention = "vilbert",
    candidate_boxes: Sequence[Any] | None = None,
    num_regions: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """RefCOCO+ accuracy: share of expressions whose chosen region's box hits the ground-truth box.

    ``pred_boxes``, ``true_boxes``: [N, 4] pixel xyxy, row i = expression i (convert refer's xywh with
    :func:`xywh_to_xyxy`).  ``convention``: module docstring (default: the original ViLBERT evaluation).
    ``candidate_boxes`` (per expression, its candidate regions' boxes [R_i, 4]) or ``num_regions`` (one count,
    or one per expression) give ``chance``.  Returns ``{"accuracy", "mean_iou", "num_expressions", "iou":
    [float] * N, "correct": [bool] * N, "chance": float | None, "convention": str}``.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    iou = box_iou(pred_boxes, true_boxes, convention=convention)
    if iou.size == 0:
        raise ValueError("no expressions to evaluate")
    correct = is_correct(iou, iou_threshold=iou_threshold, convention=convention)
    chance = _chance(_boxes(true_boxes, "true_boxes"), candidate_boxes, num_regions, iou_threshold, convention)
    return {
        "accuracy": float(correct.mean()),
        "mean_iou": float(iou.mean()),
        "num_expressions": int(iou.size),
        "iou": iou.tolist(),
        "correct": correct.tolist(),
        "chance": chance,
        "convention": convention,
    }
