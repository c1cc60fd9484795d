"""Referring-expression grounding accuracy (RefCOCO+): a prediction is right when IoU(pred, truth) >= 0.5.

Source of the definition: Yu et al., "Modeling Context in Referring Expressions", ECCV 2016 (RefCOCO+), and
Lu et al., "ViLBERT", NeurIPS 2019, section 4 ("we consider a region correct if its IoU with the ground truth
box is at least 0.5"); the model picks one of the image's region proposals and that region's box is scored.

Pixel convention.  The original evaluation code (the ``computeIoU`` of the refer / MAttNet tools, and the
Faster R-CNN ``bbox_overlaps`` ViLBERT inherits) treats box corners as inclusive integer pixels, so a box
[x1, x2] is ``x2 - x1 + 1`` pixels wide.  We use the modern continuous convention of the COCO API,
torchvision (``torchvision.ops.box_iou``) and detectron2: a box [x1, y1, x2, y2] has area
``(x2 - x1) * (y2 - y1)``.  The two differ by about one pixel per side, which matters only for tiny boxes;
a zero-area box therefore has IoU 0 with everything (even with itself), and boxes that only touch have IoU 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.metrics._arrays import as_array

#: RefCOCO+ counts a prediction as correct at IoU >= this threshold (inclusive).
IOU_THRESHOLD = 0.5


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


def xywh_to_xyxy(boxes: Any) -> np.ndarray:
    """COCO / refer boxes [x, y, w, h] (float64 [N, 4] or [4]) as [x1, y1, x2, y2] = [x, y, x + w, y + h]."""
    array = as_array(boxes, name="boxes")
    if array.shape[-1] != 4:
        raise ValueError(f"boxes: expected [..., 4] in x, y, w, h, got shape {array.shape}")
    return np.concatenate([array[..., :2], array[..., :2] + array[..., 2:]], axis=-1)


def box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Element-wise IoU of two box lists [N, 4] (or single boxes [4]) in pixel xyxy: float64 [N] in [0, 1].

    Continuous convention (module docstring).  A pair whose union has zero area gets IoU 0.
    """
    a, b = _boxes(boxes_a, "boxes_a"), _boxes(boxes_b, "boxes_b")
    if a.shape != b.shape:
        raise ValueError(f"box_iou: pairs needed, got {a.shape[0]} and {b.shape[0]} boxes")
    inter_w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    inter_h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = inter_w * inter_h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    safe_union = np.where(union > 0, union, 1.0)
    return np.where(union > 0, inter / safe_union, 0.0)


def grounding_scores(pred_boxes: Any, true_boxes: Any, *, iou_threshold: float = IOU_THRESHOLD) -> dict[str, Any]:
    """RefCOCO+ accuracy: share of expressions whose predicted box has IoU >= ``iou_threshold`` with the truth.

    ``pred_boxes``, ``true_boxes``: [N, 4] pixel xyxy, row i = expression i (convert refer's xywh with
    :func:`xywh_to_xyxy`).  Returns ``{"accuracy", "mean_iou", "num_expressions", "iou": [float] * N,
    "correct": [bool] * N}``.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    iou = box_iou(pred_boxes, true_boxes)
    if iou.size == 0:
        raise ValueError("no expressions to evaluate")
    correct = iou >= iou_threshold
    return {
        "accuracy": float(correct.mean()),
        "mean_iou": float(iou.mean()),
        "num_expressions": int(iou.size),
        "iou": iou.tolist(),
        "correct": correct.tolist(),
    }
