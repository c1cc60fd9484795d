"""Reading task files in their native formats, and the COCO instances suite (ground truth and RefCOCO+).

Every flattener keeps each row's original object, so a quarantined row is stored exactly as it was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from components.validation.engine import TableCheck, TableOutcome, must_be_true, not_null, unique
from components.validation.limits import ValidationLimits
from components.validation.refs import ImageIndex, add_image_columns, image_rules, nullable

Validate = Callable[[TableCheck], TableOutcome]
"""Runs one table's suite (``GxValidator.validate``)."""


def load_json(path: Path, key: str | None = None) -> tuple[Any, list[str]]:
    """The parsed file (or its ``key``), and the problems that make the whole file unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, [f"{path.name} unreadable: {exc}"]
    if key is None:
        return data, []
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        return None, [f"{path.name} has no {key!r} list"]
    return data[key], []


def load_jsonl(path: Path) -> tuple[list[tuple[int, Any, str | None]], list[str]]:
    """``(line number, object, parse error or None)`` per non-empty line (a bad line is a row problem), problems."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        return [], [f"{path.name} unreadable: {exc}"]
    rows: list[tuple[int, Any, str | None]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rows.append((n, obj, None) if isinstance(obj, dict) else (n, {"text": line}, "not a JSON object"))
        except ValueError as exc:
            rows.append((n, {"text": line}, str(exc)))
    return rows, []


def field(obj: Any, key: str) -> Any:
    """``obj[key]`` for a dict row, None otherwise (a non-dict row then fails its not-null rules)."""
    return obj.get(key) if isinstance(obj, dict) else None


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _bbox(value: Any) -> tuple[float, float, float, float] | None:
    """A COCO [x, y, w, h] box with finite numbers and positive size, or None."""
    if not isinstance(value, list) or len(value) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    x, y, w, h = (float(v) for v in value)
    return (x, y, w, h) if w > 0 and h > 0 else None


def box_inside(box: tuple[float, float, float, float], size: tuple[int, int] | None, tol: float) -> bool | None:
    """Whether an [x, y, w, h] box lies in a (width, height) image, within ``tol`` pixels (None: size unknown)."""
    if size is None:
        return None
    x, y, w, h = box
    return x >= -tol and y >= -tol and x + w <= size[0] + tol and y + h <= size[1] + tol


def instances_check(
    name: str, path: Path, root: Path, images: ImageIndex, limits: ValidationLimits
) -> TableCheck | None:
    """One row per COCO instance annotation: ids, image, box well-formed and inside the image, category."""
    if not path.is_file():
        return None
    data, problems = load_json(path)
    anns: list[Any] = []
    categories: set[Any] = set()
    local: dict[Any, Any] = {}
    if not problems:
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            anns = data["annotations"]
            categories = {field(c, "id") for c in as_list(data.get("categories"))}
            local = {field(i, "id"): field(i, "file_name") for i in as_list(data.get("images"))}
        else:
            problems = [f"{path.name} has no 'annotations' list"]
    frame = pd.DataFrame(
        {
            "id": nullable(field(a, "id") for a in anns),
            "image_id": nullable(field(a, "image_id") for a in anns),
            "category_id": nullable(field(a, "category_id") for a in anns),
        }
    )
    resolved = [images.resolve(i, local.get(i)) if isinstance(i, int | str) else None for i in frame["image_id"]]
    add_image_columns(frame, resolved, images)
    boxes = [_bbox(field(a, "bbox")) for a in anns]
    frame["chk_bbox_valid"] = nullable(b is not None for b in boxes)
    frame["chk_box_inside"] = nullable(
        None if b is None or r is None else box_inside(b, images.size.get(r), limits.box_tolerance_px)
        for b, r in zip(boxes, resolved, strict=True)
    )
    frame["chk_category_known"] = nullable(
        c in categories if isinstance(c, int | str) else None for c in frame["category_id"]
    )
    rules = [
        not_null("id", "missing_annotation_id", "the annotation has no id"),
        unique("id", "duplicate_annotation_id", "the annotation id occurs more than once"),
        not_null("image_id"),
        *image_rules("annotation"),
        must_be_true("chk_bbox_valid", "bad_bbox", "bbox is not 4 finite numbers [x, y, w, h] with w, h > 0"),
        must_be_true("chk_box_inside", "box_outside_image", "the box extends outside its image"),
        must_be_true("chk_category_known", "unknown_category", "category_id is not in the file's categories"),
        not_null("category_id", "unknown_category", "category_id is empty"),
    ]
    return TableCheck(
        name=name,
        source=str(path.relative_to(root)),
        frame=frame,
        row_id_column="id",
        rules=rules if not problems else [],
        record=lambda i: anns[i],
        problems=problems,
    )


def coco_images_of(path: Path) -> list[Any]:
    """The ``images`` list of a COCO instances file ([] when absent or unreadable: its check reports that)."""
    data, problems = load_json(path)
    return as_list(data.get("images")) if not problems and isinstance(data, dict) else []
