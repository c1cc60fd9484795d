"""Backend ``detector``: torchvision Faster R-CNN ResNet-50 FPN with weights the user supplies.

Region selection follows bottom-up-attention (the detector the paper used, ``tools/generate_tsv.py``):
the RPN's proposals are scored by the box head, every foreground class runs its own NMS over the
proposals, a proposal's confidence is its best surviving class score, and the kept regions are those
over ``conf_threshold`` (topped up to ``min_boxes`` with the next best, cut at ``max_boxes``).  The
stored boxes are the proposals themselves, the features are the box head's output (FPN ``TwoMLPHead``:
D = 1024) and the class distribution is the softmax of the box predictor's logits (class 0: background).

Weights are never downloaded: pass a state dict file (``.pt``/``.pth``/``.bin`` read with
``torch.load(weights_only=True)``, or ``.safetensors``), local or on S3.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from components.features.backends.base import (
    BackendError,
    BoxLimits,
    ImageRegions,
    PrepareContext,
    PreparedBackend,
    best_class_scores,
    select_regions,
    sha256_file,
)

#: Output width of torchvision's FPN box head (``TwoMLPHead``, representation size 1024).
BOX_HEAD_SIZE = 1024
_CLASS_WEIGHT_KEY = "roi_heads.box_predictor.cls_score.weight"


@dataclass(frozen=True)
class DetectorOptions:
    """Options of the ``detector`` backend."""

    weights: str | None = None
    """State dict of a torchvision ``fasterrcnn_resnet50_fpn``: local path or s3:// URI (.pt/.pth/.bin/.safetensors)."""
    min_size: int = 600
    """Shorter image side after resizing (bottom-up-attention tests at 600)."""
    max_size: int = 1000
    """Longer image side cap after resizing (bottom-up-attention: 1000)."""
    proposals: int = 300
    """RPN proposals per image scored by the box head (bottom-up-attention: 300)."""
    score_floor: float = 0.0
    """Skip (proposal, class) pairs scoring under this in the per-class NMS (0 = exact, all classes)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.max_size:
            raise BackendError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.proposals < 1:
            raise BackendError(f"proposals must be >= 1, got {self.proposals}")
        if not 0.0 <= self.score_floor < 1.0:
            raise BackendError(f"score_floor must lie in [0, 1), got {self.score_floor}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling code: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code, a truncated file: report which file and why
        raise BackendError(f"cannot read weights {path}: {exc}") from exc
    for wrapper in ("model", "state_dict"):  # training-loop checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackendError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_detector(state: dict[str, torch.Tensor], options: DetectorOptions) -> torch.nn.Module:
    """A Faster R-CNN R50-FPN holding ``state`` (checked strictly, BatchNorm step counters aside), in eval mode.

    The network is built on the meta device and the state assigned into it: no time is spent on a random
    initialisation that the weights would overwrite anyway.
    """
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    if _CLASS_WEIGHT_KEY not in state:
        raise BackendError(f"weights lack {_CLASS_WEIGHT_KEY}: not a torchvision fasterrcnn_resnet50_fpn state dict")
    with torch.device("meta"):
        model = fasterrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=state[_CLASS_WEIGHT_KEY].shape[0],
            min_size=options.min_size,
            max_size=options.max_size,
            rpn_pre_nms_top_n_test=max(1000, options.proposals),
            rpn_post_nms_top_n_test=options.proposals,
        )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise BackendError(f"weights do not match fasterrcnn_resnet50_fpn: {exc}") from None
    # weights=None builds BatchNorm2d where released checkpoints hold FrozenBatchNorm2d: same tensors in
    # eval mode, minus the step counter, so only that counter may be missing.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise BackendError(
            f"weights do not match fasterrcnn_resnet50_fpn: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)})"
        )
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:  # the step counters left out above
                module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    return model.eval()


class DetectorExtractor:
    """A loaded Faster R-CNN: RGB images in, bottom-up-attention style regions out."""

    def __init__(self, model: torch.nn.Module, limits: BoxLimits, score_floor: float, device: str) -> None:
        self.model = model.to(device)
        self.limits = limits
        self.score_floor = score_floor
        self.device = torch.device(device)

    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> list[ImageRegions]:
        """Regions of each RGB uint8 image [H, W, 3]."""
        if not images:
            return []
        model: Any = self.model  # torchvision's GeneralizedRCNN parts are untyped attributes
        tensors = [
            torch.from_numpy(np.ascontiguousarray(im)).to(self.device).permute(2, 0, 1).float() / 255 for im in images
        ]
        batch, _ = model.transform(tensors)  # resize + normalise + pad
        feature_maps = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, feature_maps)
        pooled = model.roi_heads.box_roi_pool(feature_maps, proposals, batch.image_sizes)
        hidden = model.roi_heads.box_head(pooled)  # (sum R, 1024)
        logits, _ = model.roi_heads.box_predictor(hidden)  # (sum R, C); box deltas are not used
        probs = torch.softmax(logits.float(), dim=-1)
        out = []
        counts = [len(p) for p in proposals]
        for im, rois, feats, prob, size in zip(
            images, proposals, hidden.split(counts), probs.split(counts), batch.image_sizes, strict=True
        ):
            rois, feats, prob = rois.float().cpu(), feats.float().cpu(), prob.cpu()
            keep = select_regions(
                best_class_scores(rois, prob, self.limits.nms_threshold, self.score_floor), self.limits
            )
            h, w = im.shape[:2]
            scale = torch.tensor([w / size[1], h / size[0], w / size[1], h / size[0]])
            boxes = rois[keep] * scale
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append(ImageRegions(boxes.numpy(), feats[keep].numpy(), prob[keep].numpy()))
        return out


def _local_copy(uri: str) -> Path:
    """A local path for ``uri``: the path itself, or a download of an s3:// object into a temp folder."""
    if not uri.startswith("s3://"):
        path = Path(uri)
        if not path.is_file():
            raise BackendError(f"detector weights not found: {uri}")
        return path
    from components import storage

    target = Path(tempfile.mkdtemp(prefix="vilbert-detector-")) / Path(uri).name
    storage.download_file(uri, target)
    return target


class DetectorBackend:
    """Registry entry ``detector``."""

    name: ClassVar[str] = "detector"
    max_threads: ClassVar[int | None] = None  # ResNet-50 convolutions use every thread they get

    def __init__(self, options: DetectorOptions) -> None:
        self.options = options

    def prepare(self, ctx: PrepareContext) -> PreparedBackend:
        """Fetch and hash the weights, read C from them; fails early on a file that is not a detector."""
        if not self.options.weights:
            raise BackendError("backend 'detector' needs weights (--weights PATH or s3://...); none are downloaded")
        local = _local_copy(self.options.weights)
        state = load_state_dict_file(local)
        build_detector(state, self.options)  # check the keys and shapes once, here, not in every worker
        num_classes = int(state[_CLASS_WEIGHT_KEY].shape[0])
        ctx.log(f"detector: {self.options.weights} ({num_classes} classes)")
        return PreparedBackend(
            backend=self.name,
            weights_uri=str(local) if not self.options.weights.startswith("s3://") else self.options.weights,
            weights_sha256=sha256_file(local),
            feature_size=BOX_HEAD_SIZE,
            num_classes=num_classes,
            settings={
                "min_size": self.options.min_size,
                "max_size": self.options.max_size,
                "proposals": self.options.proposals,
                "score_floor": self.options.score_floor,
            },
        )

    @staticmethod
    def load(prepared: PreparedBackend, limits: BoxLimits, device: str) -> DetectorExtractor:
        """Build the model in this process from the prepared weights."""
        options = DetectorOptions(weights=prepared.weights_uri, **prepared.settings)
        local = _local_copy(prepared.weights_uri)
        if sha256_file(local) != prepared.weights_sha256:
            raise BackendError(f"weights at {prepared.weights_uri} changed since the run started")
        model = build_detector(load_state_dict_file(local), options)
        return DetectorExtractor(model, limits, options.score_floor, device)
