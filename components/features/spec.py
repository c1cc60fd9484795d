"""The feature spec (what produced a store's features, their sizes) and one image's regions, validated."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from model.config import ViLBertConfig

BOX_DTYPE, VALUE_DTYPE = np.dtype("<f4"), np.dtype("<f2")  # on disk: boxes float32, features / classes float16
FP16_MAX = float(np.finfo(np.float16).max)
CLASS_SUM_TOLERANCE = 1e-2  # |sum(row) - 1| allowed for a class distribution on the way in
UNIFORM_SUFFIX = "+uniform-class-probs"  # backend suffix: class_probs are a placeholder, not a detector's output
_BACKEND_RE = re.compile(r"^[a-z][a-z0-9_-]*(:[a-z0-9_-]+)?(\+uniform-class-probs)?$")


class FeatureSpecMismatch(ValueError):
    """A feature spec does not fit the model config, or a store's spec differs from the expected one."""


class InvalidRegionFeatures(ValueError):
    """One image's regions break the spec; ``code`` is a short machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class FeatureSpec:
    """What produced a store's features and their sizes; the model checks it before training or inference."""

    backend: str
    """Producer: ``demo``, ``detector`` or ``import:<format>``; ``+uniform-class-probs`` marks placeholder classes."""
    weights_sha256: str | None
    """sha256 of the extractor weights (hex), or None when unknown (imports)."""
    feature_size: int
    """D, the length of each region feature vector."""
    num_classes: int
    """C, the length of each region's class distribution."""
    min_boxes: int
    """Fewest regions an image may have (at least 1: an image without regions is an error)."""
    max_boxes: int
    """Most regions an image may have (K)."""
    version: int = 1
    """Version of this spec / record format."""

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"FeatureSpec: {message}")

        need(isinstance(self.backend, str) and bool(_BACKEND_RE.match(self.backend)), f"bad backend {self.backend!r}")
        need(
            self.weights_sha256 is None
            or (
                isinstance(self.weights_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256) is not None
            ),
            "weights_sha256 must be None or 64 lowercase hex digits",
        )
        for name in ("feature_size", "num_classes", "min_boxes", "max_boxes", "version"):
            need(type(getattr(self, name)) is int, f"{name} must be an int")
        need(self.feature_size > 0 and self.num_classes > 0, "feature_size and num_classes must be positive")
        need(1 <= self.min_boxes <= self.max_boxes, "need 1 <= min_boxes <= max_boxes")
        need(self.version == 1, f"unsupported version {self.version} (this code reads version 1)")

    @property
    def uniform_class_probs(self) -> bool:
        """True when class_probs are a uniform placeholder (no detector classes): unfit for masked-region KL."""
        return self.backend.endswith(UNIFORM_SUFFIX)

    def record_nbytes(self, num_boxes: int) -> int:
        """Bytes of one record with ``num_boxes`` regions (without alignment padding)."""
        return num_boxes * (4 * BOX_DTYPE.itemsize + (self.feature_size + self.num_classes) * VALUE_DTYPE.itemsize)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        """Build from the JSON form; unknown or missing keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"FeatureSpec: unknown keys {sorted(unknown)}")
        missing = known - set(data) - {"version"}
        if missing:
            raise ValueError(f"FeatureSpec: missing keys {sorted(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        """Hex sha256 of the canonical JSON (sorted keys, no spaces): the lineage id of this spec."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def check_model(self, config: ViLBertConfig) -> None:
        """Raise :class:`FeatureSpecMismatch` unless D (and, for the KL region objective, C) match ``config.vision``.

        With ``region_objective="regression"`` the region head predicts the D-dim feature, so the class count
        of the store does not constrain the model."""
        problems = []
        if self.feature_size != config.vision.feature_size:
            problems.append(
                f"feature_size {self.feature_size} != model vision.feature_size {config.vision.feature_size}"
            )
        if config.region_objective == "kl" and self.num_classes != config.vision.target_size:
            problems.append(f"num_classes {self.num_classes} != model vision.target_size {config.vision.target_size}")
        if problems:
            raise FeatureSpecMismatch(
                f"features from backend {self.backend!r} do not fit this model: " + "; ".join(problems)
            )


@dataclass
class RegionFeatures:
    """One image's detector regions (region 0, the whole-image token, is not included)."""

    image_id: str
    """The image's id in the manifest."""
    boxes: np.ndarray
    """float32 [R, 4]: pixel x1, y1, x2, y2."""
    features: np.ndarray
    """[R, D] region features (float16 when read from a store)."""
    class_probs: np.ndarray
    """[R, C] detector class distribution per region (float16 when read from a store)."""
    image_w: int
    """Image width in pixels."""
    image_h: int
    """Image height in pixels."""

    def validate(self, spec: FeatureSpec) -> None:
        """Raise :class:`InvalidRegionFeatures` (with a reason code) if this record breaks ``spec``."""
        if not isinstance(self.image_id, str) or not self.image_id or not self.image_id.isprintable():
            raise InvalidRegionFeatures(
                "bad_id", f"image_id must be a non-empty printable string, got {self.image_id!r}"
            )
        for name in ("image_w", "image_h"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise InvalidRegionFeatures("bad_size", f"{name} must be a positive int, got {value!r}")
        arrays = {"boxes": self.boxes, "features": self.features, "class_probs": self.class_probs}
        for name, array in arrays.items():
            if not isinstance(array, np.ndarray) or array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
                raise InvalidRegionFeatures("wrong_shape", f"{name} must be a 2-D float array")
        r = self.boxes.shape[0]
        expected = {"boxes": (r, 4), "features": (r, spec.feature_size), "class_probs": (r, spec.num_classes)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise InvalidRegionFeatures("wrong_shape", f"{name} has shape {arrays[name].shape}, expected {shape}")
        if not spec.min_boxes <= r <= spec.max_boxes:
            raise InvalidRegionFeatures("box_count", f"{r} regions, spec allows [{spec.min_boxes}, {spec.max_boxes}]")
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise InvalidRegionFeatures("non_finite", f"{name} contains NaN or inf")
        if np.abs(self.features).max() > FP16_MAX:
            raise InvalidRegionFeatures("fp16_overflow", f"features exceed the float16 range (|x| > {FP16_MAX})")
        x1, y1, x2, y2 = self.boxes.T
        inside = (x1 >= 0) & (y1 >= 0) & (x1 <= x2) & (y1 <= y2) & (x2 <= self.image_w) & (y2 <= self.image_h)
        if not inside.all():
            bad = int(np.flatnonzero(~inside)[0])
            raise InvalidRegionFeatures(
                "box_outside_image",
                f"box {bad} = {self.boxes[bad].tolist()} is not a box inside the {self.image_w}x{self.image_h} image",
            )
        sums = self.class_probs.astype(np.float64).sum(axis=1)
        if (self.class_probs < 0).any() or (np.abs(sums - 1.0) > CLASS_SUM_TOLERANCE).any():
            worst = float(sums[np.argmax(np.abs(sums - 1.0))])
            raise InvalidRegionFeatures(
                "class_probs", f"class_probs rows must be non-negative and sum to 1 (worst row sums to {worst:.4f})"
            )
