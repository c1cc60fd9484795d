"""Cross-table references: which images exist and were accepted, how task files name them, and split leakage.

Task files name images their own way (VQA/RefCOCO+: the COCO integer id; Flickr30k: a file name; VCR: an
image path). :class:`ImageIndex` resolves any of these to a manifest ``image_id``; the helpers here turn the
resolution into derived columns that GX then checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pandas as pd

from components.validation.engine import in_set, must_be_true, not_null

_TRAILING_DIGITS = re.compile(r"(\d+)$")


def _names_for(path: str) -> list[str]:
    """Keys a task file may use for an image stored at ``path``: the basename and the stem."""
    p = PurePosixPath(path)
    return [p.name, p.stem]


@dataclass
class ImageIndex:
    """The manifest, as the other tables see it."""

    known: set[str] = field(default_factory=set)
    """Every image_id present in the manifest (accepted or not)."""
    accepted: set[str] = field(default_factory=set)
    """image_ids that passed validation."""
    split: dict[str, str] = field(default_factory=dict)
    """image_id -> split (first row wins when an id is duplicated)."""
    size: dict[str, tuple[int, int]] = field(default_factory=dict)
    """image_id -> (width, height) as stated in the manifest."""
    by_name: dict[str, str] = field(default_factory=dict)
    """File basename / stem -> image_id."""
    coco_ids: dict[str, str] = field(default_factory=dict)
    """COCO integer image id (as text) -> image_id, from the ``images`` lists of COCO instance files."""

    @classmethod
    def from_manifest(cls, frame: pd.DataFrame, accepted_rows: Iterable[int]) -> ImageIndex:
        index = cls()
        ok = set(accepted_rows)
        cols = set(frame.columns)
        for pos, row in enumerate(frame.to_dict("records")):
            image_id = row.get("image_id")
            if not isinstance(image_id, str):
                continue
            index.known.add(image_id)
            if pos in ok:
                index.accepted.add(image_id)
            if "split" in cols and isinstance(row.get("split"), str):
                index.split.setdefault(image_id, row["split"])
            if {"width", "height"} <= cols and pd.notna(row.get("width")) and pd.notna(row.get("height")):
                index.size.setdefault(image_id, (int(row["width"]), int(row["height"])))
            if "path" in cols and isinstance(row.get("path"), str):
                for name in _names_for(row["path"]):
                    index.by_name.setdefault(name, image_id)
        return index

    def add_coco_images(self, entries: Iterable[Any]) -> None:
        """Learn COCO integer ids from an instances file's ``images`` list (``id`` + ``file_name``)."""
        for entry in entries:
            if isinstance(entry, dict) and entry.get("id") is not None:
                image_id = self.resolve(entry.get("file_name"))
                if image_id is not None:
                    self.coco_ids.setdefault(str(entry["id"]), image_id)

    def resolve(self, *refs: Any) -> str | None:
        """The manifest image_id that ``refs`` (an id, a file name or a path; first match wins) name."""
        for ref in refs:
            if ref is None or (isinstance(ref, float) and pd.isna(ref)) or isinstance(ref, bool):
                continue
            text = str(ref)
            if text in self.known:
                return text
            if text in self.coco_ids:
                return self.coco_ids[text]
            for name in _names_for(text):
                if name in self.by_name:
                    return self.by_name[name]
                if name in self.known:  # a file named after the image id (syn-000123.png)
                    return name
            # COCO file names (COCO_train2014_000000000123.jpg) carry the numeric id the manifest uses.
            m = _TRAILING_DIGITS.search(PurePosixPath(text).stem)
            if m and str(int(m.group(1))) in self.known:
                return str(int(m.group(1)))
        return None


def add_image_columns(frame: pd.DataFrame, resolved: Sequence[str | None], index: ImageIndex) -> None:
    """Add ``chk_image`` (the resolved image_id), ``chk_image_known`` and ``chk_image_accepted`` to ``frame``.

    ``resolved[i]`` is row i's manifest image_id, None when it names no manifest image.
    ``chk_image_accepted`` is null for unknown images, so each bad row gets exactly one of the two reasons.
    """
    frame["chk_image"] = pd.Series(list(resolved), dtype=object, index=frame.index)
    frame["chk_image_known"] = pd.Series([r is not None for r in resolved], dtype=object, index=frame.index)
    frame["chk_image_accepted"] = pd.Series(
        [None if r is None else r in index.accepted for r in resolved], dtype=object, index=frame.index
    )


def image_rules(what: str = "row") -> list[Any]:
    """Rules over the columns :func:`add_image_columns` adds."""
    return [
        must_be_true("chk_image_known", "unknown_image", f"the {what} references an image that is not in the manifest"),
        must_be_true("chk_image_accepted", "image_quarantined", f"the {what}'s image was quarantined"),
    ]


def add_one_split_column(frame: pd.DataFrame, key: str, split: str, column: str = "chk_one_split") -> None:
    """``column`` = False for rows whose ``key`` (an image) also appears under another split in this table."""
    valid = frame[key].notna() & frame[split].notna()
    counts = frame[valid].groupby(key)[split].nunique()
    leaking = set(counts[counts > 1].index)
    frame[column] = pd.Series(
        [None if not ok else k not in leaking for k, ok in zip(frame[key], valid, strict=True)],
        dtype=object,
        index=frame.index,
    )


def split_rules(splits: Sequence[str]) -> list[Any]:
    """The split is present and one of ``splits``."""
    return [
        in_set("split", "unknown_split", f"split is not one of {', '.join(splits)}", splits),
        not_null("split", "unknown_split", "split is empty"),
    ]


def leakage_rule(column: str = "chk_one_split", what: str = "image") -> Any:
    return must_be_true(column, "split_leakage", f"the {what} appears in more than one split", fatal=True)


def text_stats(texts: Sequence[Any]) -> tuple[int | None, int | None]:
    """(shortest, longest) stripped length in characters of a list of sentences; (None, None) if empty."""
    lengths = [len(t.strip()) if isinstance(t, str) else 0 for t in texts]
    return (min(lengths), max(lengths)) if lengths else (None, None)


def nullable(values: Iterable[Any]) -> pd.Series:
    """An object Series that keeps None as None (GX skips nulls in map expectations)."""
    return pd.Series(list(values), dtype=object)
