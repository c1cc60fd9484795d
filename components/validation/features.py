"""The feature-store suite: one row per stored image, with what our code measured on its regions.

Measured per image: region count, feature / class dimensions, finiteness, class-distribution sums, box
order and containment, image size against the manifest, and (when the store can tell) its checksum.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd

from components.validation.engine import TableCheck, between, in_set, must_be_true, unique
from components.validation.limits import ValidationLimits
from components.validation.refs import ImageIndex, add_image_columns, image_rules


class FeatureSource(Protocol):
    """What the suite reads: ``components.features.store.FeatureStore`` has this shape."""

    spec: Any
    """Has ``feature_size``, ``num_classes``, ``min_boxes``, ``max_boxes``."""

    def image_ids(self) -> list[str]: ...

    def __getitem__(self, image_id: str) -> Any: ...


def _finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


def measure(rf: Any, tol: float) -> dict[str, Any]:
    """The derived columns for one image's ``RegionFeatures``."""
    boxes = np.asarray(rf.boxes)
    feats = np.asarray(rf.features)
    probs = np.asarray(rf.class_probs)
    out: dict[str, Any] = {
        "num_regions": int(boxes.shape[0]) if boxes.ndim == 2 else None,
        "box_dim": int(boxes.shape[1]) if boxes.ndim == 2 else None,
        "feature_dim": int(feats.shape[1]) if feats.ndim == 2 else None,
        "class_dim": int(probs.shape[1]) if probs.ndim == 2 else None,
        "image_w": int(rf.image_w),
        "image_h": int(rf.image_h),
        "chk_readable": True,
    }
    r = out["num_regions"]
    out["chk_shapes_consistent"] = (
        boxes.ndim == feats.ndim == probs.ndim == 2 and out["box_dim"] == 4 and feats.shape[0] == r == probs.shape[0]
    )
    out["chk_features_finite"] = _finite(feats)
    out["chk_boxes_finite"] = _finite(boxes)
    out["chk_class_probs_finite"] = _finite(probs)
    if out["chk_shapes_consistent"] and out["chk_class_probs_finite"] and r:
        sums = probs.astype(np.float64).sum(axis=1)  # fp16 rows summed in fp64: only the storage rounding remains
        out["chk_class_sum_error"] = float(np.abs(sums - 1.0).max())
        out["chk_class_probs_nonneg"] = bool((probs >= 0).all())
    if out["chk_shapes_consistent"] and out["chk_boxes_finite"] and r:
        x1, y1, x2, y2 = boxes.astype(np.float64).T
        out["chk_boxes_ordered"] = bool(((x1 <= x2) & (y1 <= y2)).all())
        w, h = out["image_w"], out["image_h"]
        inside = (x1 >= -tol) & (y1 >= -tol) & (x2 <= w + tol) & (y2 <= h + tol)
        out["chk_boxes_inside"] = bool(inside.all())
    return out


_COLUMNS = (
    "num_regions",
    "box_dim",
    "feature_dim",
    "class_dim",
    "image_w",
    "image_h",
    "chk_readable",
    "chk_checksum_ok",
    "chk_shapes_consistent",
    "chk_features_finite",
    "chk_boxes_finite",
    "chk_class_probs_finite",
    "chk_class_sum_error",
    "chk_class_probs_nonneg",
    "chk_boxes_ordered",
    "chk_boxes_inside",
)


def features_check(store: FeatureSource, images: ImageIndex, limits: ValidationLimits, source: str) -> TableCheck:
    """The feature store as a table, one row per image, with its rules (dimensions from the store's spec)."""
    spec = store.spec
    ids = list(store.image_ids())
    verify = getattr(store, "verify", None)
    corrupt = set(verify()) if callable(verify) else None  # crc32 of every record, when the store keeps them
    rows = []
    for image_id in ids:
        try:
            row = measure(store[image_id], limits.box_tolerance_px)
        except Exception as exc:  # a record that cannot be read is this row's problem
            row = {"chk_readable": False, "error": str(exc)}
        row["chk_checksum_ok"] = None if corrupt is None else image_id not in corrupt
        rows.append(row)
    frame = pd.DataFrame({"image_id": pd.Series(ids, dtype=object)})
    for col in _COLUMNS:
        frame[col] = pd.Series([r.get(col) for r in rows], dtype=object)
    resolved = [i if i in images.known else None for i in ids]
    add_image_columns(frame, resolved, images)
    frame["chk_size_matches"] = pd.Series(
        [
            None
            if i is None or i not in images.size or "image_w" not in r
            else images.size[i] == (r["image_w"], r["image_h"])
            for i, r in zip(resolved, rows, strict=True)
        ],
        dtype=object,
    )
    rules = [
        unique("image_id", description="the image is stored twice"),
        must_be_true("chk_readable", "unreadable_record", "the image's record cannot be read"),
        must_be_true("chk_checksum_ok", "checksum_mismatch", "the record's bytes do not match their crc32"),
        *image_rules("feature record"),
        must_be_true("chk_size_matches", "image_size_mismatch", "image_w/image_h differ from the manifest's size"),
        between(
            "num_regions",
            "region_count_out_of_range",
            f"the number of regions is outside [{limits.min_regions}, {limits.max_regions}]",
            limits.min_regions,
            limits.max_regions,
        ),
        in_set(
            "feature_dim",
            "feature_dim_mismatch",
            f"feature size is not the spec's {spec.feature_size}",
            [spec.feature_size],
        ),
        in_set(
            "class_dim", "class_dim_mismatch", f"class count is not the spec's {spec.num_classes}", [spec.num_classes]
        ),
        must_be_true(
            "chk_shapes_consistent", "inconsistent_shapes", "boxes / features / class_probs row counts differ"
        ),
        must_be_true("chk_features_finite", "non_finite_features", "a feature value is NaN or infinite"),
        must_be_true("chk_boxes_finite", "non_finite_boxes", "a box coordinate is NaN or infinite"),
        must_be_true("chk_class_probs_finite", "non_finite_class_probs", "a class probability is NaN or infinite"),
        between(
            "chk_class_sum_error",
            "class_probs_not_normalized",
            f"a region's class distribution does not sum to 1 (tolerance {limits.class_sum_tolerance})",
            max_value=limits.class_sum_tolerance,
        ),
        must_be_true("chk_class_probs_nonneg", "negative_class_prob", "a class probability is negative"),
        must_be_true("chk_boxes_ordered", "degenerate_box", "a box has x2 < x1 or y2 < y1"),
        must_be_true("chk_boxes_inside", "box_outside_image", "a box extends outside the image"),
    ]
    records = {
        i: {"image_id": ids[i], **{k: v for k, v in r.items() if not k.startswith("chk_")}} for i, r in enumerate(rows)
    }
    return TableCheck(
        name="features",
        source=source,
        frame=frame,
        row_id_column="image_id",
        rules=rules,
        record=lambda i: records[i],
    )
