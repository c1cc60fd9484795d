"""The Flickr30k suite: Karpathy-style ``dataset_flickr30k.json``, one row per image entry.

Each entry must name a manifest image (by ``filename``), once, in one split, with sentences of
acceptable length.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.validation.captions import text_length_rules
from components.validation.engine import TableCheck, TableOutcome, between, id_rules, not_null, unique
from components.validation.limits import ValidationLimits
from components.validation.refs import (
    ImageIndex,
    add_image_columns,
    add_one_split_column,
    image_rules,
    leakage_rule,
    nullable,
    split_rules,
    text_stats,
)
from components.validation.taskfiles import Validate, as_list, field, load_json

KARPATHY_SPLITS = ("train", "val", "test", "restval")
FLICKR_FILE = "dataset_flickr30k.json"


def validate_flickr30k(
    root: Path, images: ImageIndex, limits: ValidationLimits, validate: Validate
) -> list[TableOutcome]:
    """Validate ``tasks/flickr30k`` (nothing when the folder is absent)."""
    folder = root / "tasks" / "flickr30k"
    if not folder.is_dir():
        return []
    entries, problems = load_json(folder / FLICKR_FILE, "images")
    entries = entries or []
    stats = [text_stats([field(s, "raw") for s in as_list(field(e, "sentences"))]) for e in entries]
    frame = pd.DataFrame(
        {
            "imgid": nullable(field(e, "imgid") for e in entries),
            "filename": nullable(field(e, "filename") for e in entries),
            "split": nullable(field(e, "split") for e in entries),
            "num_sentences": nullable(len(as_list(field(e, "sentences"))) for e in entries),
            "chk_shortest_chars": nullable(s[0] for s in stats),
            "chk_longest_chars": nullable(s[1] for s in stats),
        }
    )
    add_image_columns(frame, [images.resolve(f) for f in frame["filename"]], images)
    add_one_split_column(frame, "chk_image", "split")
    rules = [
        *id_rules("imgid"),
        not_null("filename"),
        unique("chk_image", "duplicate_image", "two entries name the same image"),
        *image_rules("entry"),
        between("num_sentences", "no_sentences", "the entry has no sentences", min_value=1),
        *text_length_rules("chk_shortest_chars", "sentence", limits, longest="chk_longest_chars"),
        *split_rules(KARPATHY_SPLITS),
        leakage_rule(what="entry's image"),
    ]
    check = TableCheck(
        name="flickr30k",
        source=f"tasks/flickr30k/{FLICKR_FILE}",
        frame=frame,
        row_id_column="imgid",
        rules=rules,
        record=lambda i: entries[i],
        problems=problems,
    )
    return [validate(check)]
