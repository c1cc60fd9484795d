"""Class-agnostic box proposals for the ``demo`` detector: colour segmentation into connected regions.

The synthetic world paints flat-coloured shapes over textured, muted backgrounds.  A pixel is an edge
when its colour differs from its right or lower neighbour by more than ``edge_threshold`` in any channel;
the remaining pixels split into 4-connected regions (``scipy.ndimage.label``), and every region of
reasonable size proposes its box.  Regions of similar colour that touch propose their union too (a
shape cut in two by an object in front of it), and a fixed grid of windows (whole image, 2x2, 3x3) plays
the part of anchors, so an image always has proposals.

Like a real detector's proposals these are imperfect: touching same-coloured shapes merge into one
region, background stripes and checker cells propose boxes of their own, and a shape's outline ring may
split from its fill.  The region classifier (``demo.py``) learns which proposals hold objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ProposalOptions:
    """How the colour segmentation proposes boxes."""

    edge_threshold: float = 30.0
    """Neighbouring pixels whose colours differ by more than this (max over channels, 0..255) are an edge."""
    min_area: int = 12
    """Regions with fewer pixels propose nothing."""
    max_area_fraction: float = 0.6
    """Regions covering more of the image than this are background and propose nothing."""
    merge_colour_distance: float = 30.0
    """Touching regions whose mean colours differ by at most this also propose their union."""
    max_proposals: int = 300
    """Cap per image (largest regions first; the grid windows always stay)."""

    def __post_init__(self) -> None:
        if self.edge_threshold <= 0 or self.merge_colour_distance < 0:
            raise ValueError("edge_threshold must be > 0 and merge_colour_distance >= 0")
        if self.min_area < 1 or not 0 < self.max_area_fraction <= 1 or self.max_proposals < 1:
            raise ValueError("need min_area >= 1, 0 < max_area_fraction <= 1, max_proposals >= 1")


def grid_windows(width: int, height: int, levels: tuple[int, ...] = (1, 2, 3)) -> np.ndarray:
    """Windows of an n x n grid for each n in ``levels``: [sum n^2, 4] pixel boxes."""
    boxes = []
    for n in levels:
        xs, ys = np.linspace(0, width, n + 1), np.linspace(0, height, n + 1)
        boxes += [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(n) for i in range(n)]
    return np.asarray(boxes, dtype=np.float32)


def segment(image: np.ndarray, edge_threshold: float) -> tuple[np.ndarray, int]:
    """Label map (0 = edge pixel) and region count of an RGB uint8 image."""
    pixels = image.astype(np.int16)
    edge = np.zeros(image.shape[:2], dtype=bool)
    # Only the left/upper pixel of a differing pair is marked, so edges are one pixel wide.
    edge[:, :-1] |= np.abs(pixels[:, 1:] - pixels[:, :-1]).max(axis=-1) > edge_threshold
    edge[:-1, :] |= np.abs(pixels[1:, :] - pixels[:-1, :]).max(axis=-1) > edge_threshold
    labels, count = ndimage.label(~edge)
    return labels, count


def propose(image: np.ndarray, options: ProposalOptions) -> np.ndarray:
    """Candidate boxes [N, 4] (pixel x1, y1, x2, y2, float32) for an RGB uint8 image [H, W, 3]."""
    height, width = image.shape[:2]
    windows = grid_windows(width, height)
    labels, count = segment(image, options.edge_threshold)
    if count == 0:
        return windows
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    slices = ndimage.find_objects(labels)
    # A region loses its last row/column to the edge it shares with its neighbour: grow boxes by one pixel.
    boxes = np.array(
        [(s[1].start - 1, s[0].start - 1, s[1].stop + 1, s[0].stop + 1) for s in slices], dtype=np.float32
    ).reshape(-1, 4)
    keep = (areas >= options.min_area) & (areas <= options.max_area_fraction * width * height)
    boxes, areas, ids = boxes[keep], areas[keep], index[keep]
    order = np.argsort(-areas, kind="stable")[: options.max_proposals]
    boxes, ids = boxes[order], ids[order]
    colours = np.stack([ndimage.mean(image[..., c], labels, ids) for c in range(3)], axis=-1).reshape(-1, 3)
    merged = _touching_unions(boxes, colours, options.merge_colour_distance)
    out = np.concatenate([boxes, merged, windows])
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return _dedupe(out)[: options.max_proposals + len(windows)]


def _touching_unions(boxes: np.ndarray, colours: np.ndarray, max_distance: float) -> np.ndarray:
    """Union boxes of region pairs whose (grown) boxes overlap and whose mean colours are close."""
    if len(boxes) < 2:
        return np.zeros((0, 4), dtype=np.float32)
    lo = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    touching = (hi > lo).all(axis=-1)
    close = np.abs(colours[:, None] - colours[None, :]).max(axis=-1) <= max_distance
    i, j = np.nonzero(np.triu(touching & close, k=1))
    union = np.concatenate([np.minimum(boxes[i, :2], boxes[j, :2]), np.maximum(boxes[i, 2:], boxes[j, 2:])], axis=1)
    return union.astype(np.float32).reshape(-1, 4)


def _dedupe(boxes: np.ndarray, iou: float = 0.95) -> np.ndarray:
    """Drop boxes nearly identical to an earlier one (order kept)."""
    import torch
    from torchvision.ops import box_iou

    t = torch.from_numpy(boxes)
    overlap = box_iou(t, t).triu(diagonal=1)
    duplicate = (overlap > iou).any(dim=0)
    return boxes[~duplicate.numpy()]
