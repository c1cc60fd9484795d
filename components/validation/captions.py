"""The captions suite: ids, caption length, the image it describes (exists, accepted, same split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from components.validation.engine import TableCheck, between, id_rules, in_set, not_null, same_as, schema_rules
from components.validation.limits import ValidationLimits
from components.validation.manifest import SPLITS, arrow_record, read_parquet
from components.validation.refs import ImageIndex, add_image_columns, image_rules, nullable

CAPTION_COLUMNS = {"caption_id": "str", "image_id": "str", "caption": "str", "split": "str", "source": "str"}


def text_length_rules(column: str, what: str, limits: ValidationLimits, longest: str | None = None) -> list[Any]:
    """Too short / too long, on derived columns of stripped lengths in characters (null = no text).

    ``column`` holds the (shortest) length; ``longest`` the longest one for rows with several texts.
    """
    return [
        between(
            column,
            f"{what}_too_short",
            f"the {what} has fewer than {limits.min_text_chars} characters",
            min_value=limits.min_text_chars,
        ),
        between(
            longest or column,
            f"{what}_too_long",
            f"the {what} has more than {limits.max_text_chars} characters",
            max_value=limits.max_text_chars,
        ),
    ]


def stripped_lengths(values: pd.Series) -> pd.Series:
    return nullable(len(v.strip()) if isinstance(v, str) else None for v in values)


def captions_check(root: Path, images: ImageIndex, limits: ValidationLimits) -> tuple[TableCheck, pa.Table | None]:
    """The captions table with its derived columns and rules (and the Arrow table, for the accepted output)."""
    table, frame, problems = read_parquet(root / "captions.parquet")
    ids = frame["image_id"] if "image_id" in frame else pd.Series([None] * len(frame))
    resolved = [i if isinstance(i, str) and i in images.known else None for i in ids]
    add_image_columns(frame, resolved, images)
    # only accepted images: a rejected image's captions are already out, and its split may be the bad field
    frame["chk_image_split"] = nullable(images.split.get(r) if r in images.accepted else None for r in resolved)
    frame["chk_caption_chars"] = stripped_lengths(
        frame["caption"] if "caption" in frame else pd.Series([None] * len(frame))
    )
    derived = [c for c in frame.columns if c.startswith("chk_")]
    leak = "the caption's split differs from its image's split (the image would leak across splits)"
    rules = [
        *schema_rules(CAPTION_COLUMNS, derived),
        *id_rules("caption_id"),
        not_null("image_id"),
        not_null("caption"),
        *text_length_rules("chk_caption_chars", "caption", limits),
        *image_rules("caption"),
        in_set("split", "unknown_split", f"split is not one of {', '.join(SPLITS)}", SPLITS),
        same_as("split", "chk_image_split", "split_mismatch", leak, fatal=True),
    ]
    check = TableCheck(
        name="captions",
        source="captions.parquet",
        frame=frame,
        row_id_column="caption_id",
        rules=rules if table is not None else [],
        record=arrow_record(table, frame),
        problems=problems,
    )
    return check, table
