"""What every feature-extraction backend provides, and the region selection they share.

A backend turns RGB images into up to K regions each: pixel boxes, a feature vector per region and the
detector's class distribution per region (the masked-region target).  It runs in two phases:

* :meth:`Backend.prepare` runs once, in the launching process: resolve or train the weights, hash them,
  and describe them in a picklable :class:`PreparedBackend`;
* :meth:`Backend.load` runs in every worker process: build the model from that description and return an
  :class:`Extractor`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torchvision.ops import nms

if TYPE_CHECKING:
    import pandas as pd


class BackendError(ValueError):
    """A backend cannot be prepared or loaded (missing or mismatched weights, bad options)."""


@dataclass(frozen=True)
class BoxLimits:
    """How many regions to keep per image, as in bottom-up-attention's ``generate_tsv.py``."""

    min_boxes: int = 10
    """Keep at least this many regions (the top-scoring ones) even when fewer pass the threshold."""
    max_boxes: int = 36
    """Keep at most this many regions (K)."""
    conf_threshold: float = 0.2
    """A region is kept when its best non-background class score after per-class NMS reaches this."""
    nms_threshold: float = 0.3
    """IoU above which a lower-scoring region is suppressed, per class."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise BackendError(f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes} and {self.max_boxes}")
        if not 0.0 <= self.conf_threshold <= 1.0:
            raise BackendError(f"conf_threshold must lie in [0, 1], got {self.conf_threshold}")
        if not 0.0 < self.nms_threshold <= 1.0:
            raise BackendError(f"nms_threshold must lie in (0, 1], got {self.nms_threshold}")


@dataclass
class ImageRegions:
    """One image's regions, as a backend returns them (float32; the store casts to its dtypes)."""

    boxes: np.ndarray
    """[R, 4] pixel x1, y1, x2, y2 in the decoded image's coordinates."""
    features: np.ndarray
    """[R, D] region features."""
    class_probs: np.ndarray
    """[R, C] class distribution per region (rows sum to 1; class 0 is background)."""


@dataclass(frozen=True)
class PreparedBackend:
    """Everything a worker needs to load the backend; picklable, sent to every worker and rank."""

    backend: str
    """Registry name (``detector``, ``demo``)."""
    weights_uri: str
    """Local path or s3:// URI of the weights (a file, or a folder for ``demo``)."""
    weights_sha256: str
    """sha256 of the weights file; goes into the feature spec."""
    feature_size: int
    """D."""
    num_classes: int
    """C (background included)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Backend options the workers need (JSON-able)."""
    report: dict[str, Any] = field(default_factory=dict)
    """Metrics of the preparation (for ``demo``: training losses, held-out box recall)."""


@dataclass
class PrepareContext:
    """What :meth:`Backend.prepare` may read and where it may write."""

    dataset: str
    """Dataset root (local or s3://) holding manifest.parquet, images/ and annotations/."""
    manifest: pd.DataFrame
    """The manifest rows (all of them: a backend that trains picks its own splits)."""
    store: str
    """Feature store root (local or s3://); a trained backend saves its weights below it."""
    work_dir: Path
    """A local scratch folder for this run."""
    limits: BoxLimits
    """Region limits of this run."""
    device: str = "cpu"
    """torch device for training or checks."""
    seed: int = 0
    """Random seed for anything trained."""
    log: Callable[[str], None] = print
    """Where progress messages go."""


class Extractor(Protocol):
    """A loaded backend: images in, regions out."""

    def extract(self, images: Sequence[np.ndarray]) -> list[ImageRegions]:
        """Regions of each RGB uint8 image [H, W, 3], in the same order."""
        ...


class Backend(Protocol):
    """A feature-extraction backend registered by name in :mod:`components.features.backends`."""

    name: ClassVar[str]
    max_threads: ClassVar[int | None]
    """Default cap on torch threads per extraction process (None: no cap)."""

    def prepare(self, ctx: PrepareContext) -> PreparedBackend: ...

    def load(self, prepared: PreparedBackend, limits: BoxLimits, device: str) -> Extractor: ...


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes into RGB uint8 [H, W, 3]; raises on anything Pillow cannot fully decode.

    The stored pixel grid is used as is (no EXIF rotation), so boxes and the image size agree with the
    manifest's width and height.  Transparent images are composited over white; greyscale, palette, CMYK
    and 16-bit images are converted to 8-bit RGB.
    """
    import io

    from PIL import Image

    image: Image.Image = Image.open(io.BytesIO(data))
    image.load()  # decode now: truncated or corrupt data fails here, not later
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"decoded to an unusable array of shape {rgb.shape}")
    return rgb


def read_images(uris: Iterable[str], workers: int = 8) -> Iterator[bytes | Exception]:
    """The bytes of each URI (local or s3://) in order, read on a thread pool; a failed read yields its exception."""
    from components import storage

    def read(uri: str) -> bytes | Exception:
        try:
            return storage.read_bytes(uri)
        except Exception as exc:  # the caller quarantines this one image, the run goes on
            return exc

    return storage.map_ordered(read, uris, workers)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def best_class_scores(boxes: torch.Tensor, probs: torch.Tensor, nms_threshold: float, floor: float) -> torch.Tensor:
    """Per region, its best non-background class score among the classes where it survives NMS.

    Bottom-up-attention's rule: run NMS separately for every foreground class over all regions, scored by
    that class's probability; a region's confidence is the highest score it keeps in any class (0 when it
    is suppressed everywhere).  Classes whose best score is under ``floor`` are skipped, which changes
    nothing above ``floor`` and keeps thousands-of-classes detectors fast.
    """
    best = torch.zeros(boxes.shape[0], dtype=probs.dtype)
    if boxes.shape[0] == 0:
        return best
    fg = probs[:, 1:]
    classes = torch.nonzero(fg.max(dim=0).values >= floor).flatten()
    for c in classes.tolist():
        scores = fg[:, c]
        candidates = torch.nonzero(scores >= floor).flatten()
        keep = candidates[nms(boxes[candidates], scores[candidates], nms_threshold)]
        best[keep] = torch.maximum(best[keep], scores[keep])
    return best


def select_regions(scores: torch.Tensor, limits: BoxLimits) -> torch.Tensor:
    """Indices of the regions to keep, best first: over the threshold, topped up to min, cut at max."""
    order = torch.argsort(scores, descending=True, stable=True)
    passing = int((scores >= limits.conf_threshold).sum())
    count = min(max(passing, limits.min_boxes), limits.max_boxes)
    return order[:count]


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of ``a`` [N, 4] and of ``b`` [M, 4] (x1, y1, x2, y2)."""
    from torchvision.ops import box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    return box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


def box_recall(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes that some predicted box of the same image covers with IoU >= ``iou``."""
    hit = total = 0
    for pred, gt in zip(predicted, truth, strict=True):
        total += len(gt)
        if len(gt) and len(pred):
            hit += int((box_iou_matrix(gt, pred).max(axis=1) >= iou).sum())
    return hit / total if total else float("nan")
