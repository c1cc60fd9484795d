"""The VCR (Q->A) suite: ``tasks/vcr/<split>.jsonl``, one row per line.

A line must parse, name a manifest image (``img_fn``, else ``img_id``), have a non-empty question, exactly
four answer choices, a label in 0..3 (test files carry none), and every object reference (the integer lists
inside question and answers) must point at one of the line's ``objects``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from components.validation.engine import TableCheck, TableOutcome, between, must_be_true, unique
from components.validation.limits import ValidationLimits
from components.validation.refs import (
    ImageIndex,
    add_image_columns,
    add_one_split_column,
    image_rules,
    leakage_rule,
    nullable,
)
from components.validation.taskfiles import Validate, as_list, field, load_jsonl

NUM_CHOICES = 4


def _object_refs(tokens: Any) -> list[Any]:
    """Object indices named in a VCR token list (``["Why", "is", [0], "smiling", "?"]`` -> ``[0]``)."""
    return [i for t in as_list(tokens) if isinstance(t, list) for i in t]


def _refs_ok(obj: Any) -> bool | None:
    if not isinstance(obj, dict):
        return None
    n = len(as_list(obj.get("objects")))
    refs = _object_refs(obj.get("question"))
    for choice in as_list(obj.get("answer_choices")):
        refs += _object_refs(choice)
    return all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in refs)


def _label_ok(obj: Any, split: str) -> bool | None:
    label = field(obj, "answer_label")
    if label is None and split == "test":  # the official test files have no labels
        return None
    return isinstance(label, int) and not isinstance(label, bool) and 0 <= label < NUM_CHOICES


def _text_len(tokens: Any) -> int:
    """Tokens in a VCR question (a list), or characters if a source wrote it as a string; 0 when missing."""
    if isinstance(tokens, str):
        return len(tokens.strip())
    return len(tokens) if isinstance(tokens, list) else 0


def validate_vcr(root: Path, images: ImageIndex, limits: ValidationLimits, validate: Validate) -> list[TableOutcome]:
    """Validate every ``tasks/vcr/<split>.jsonl`` (nothing when the folder is absent)."""
    folder = root / "tasks" / "vcr"
    if not folder.is_dir():
        return []
    rows: list[tuple[str, int, Any, str | None]] = []  # split, line number, object, parse error
    problems: list[str] = []
    files = sorted(folder.glob("*.jsonl"))
    if not files:  # empty files are fine (a split without questions); a folder without any is misnamed data
        problems.append("tasks/vcr has no <split>.jsonl file")
    for path in files:
        lines, bad = load_jsonl(path)
        problems += bad
        rows += [(path.stem, n, obj, err) for n, obj, err in lines]
    objs = [obj if err is None else None for _, _, obj, err in rows]
    splits = [s for s, _, _, _ in rows]
    frame = pd.DataFrame(
        {
            "row_id": nullable(
                str(field(o, "annot_id")) if field(o, "annot_id") is not None else f"{s}.jsonl:{n}"
                for (s, n, _, _), o in zip(rows, objs, strict=True)
            ),
            "annot_id": nullable(field(o, "annot_id") for o in objs),
            "img_fn": nullable(field(o, "img_fn") for o in objs),
            "split": nullable(splits),
            "num_answer_choices": nullable(len(as_list(field(o, "answer_choices"))) if o else None for o in objs),
            "chk_json_ok": nullable(err is None for _, _, _, err in rows),
            "chk_has_annot_id": nullable(None if o is None else field(o, "annot_id") is not None for o in objs),
            "chk_question_len": nullable(_text_len(field(o, "question")) if o else None for o in objs),
            "chk_label_ok": nullable(_label_ok(o, s) if o else None for s, o in zip(splits, objs, strict=True)),
            "chk_object_refs_ok": nullable(_refs_ok(o) for o in objs),
        }
    )
    resolved = [images.resolve(field(o, "img_fn"), field(o, "img_id")) if o else None for o in objs]
    add_image_columns(frame, resolved, images)
    # an unparseable line has no image to speak of: its one reason is invalid_json
    frame["chk_image_known"] = nullable(
        None if o is None else k for o, k in zip(objs, frame["chk_image_known"], strict=True)
    )
    add_one_split_column(frame, "chk_image", "split")
    rules = [
        must_be_true("chk_json_ok", "invalid_json", "the line is not a JSON object"),
        must_be_true("chk_has_annot_id", "missing_annot_id", "annot_id is empty"),
        unique("annot_id"),
        *image_rules("question"),
        between("chk_question_len", "empty_question", "the question has no tokens", min_value=1),
        between(
            "num_answer_choices",
            "bad_answer_choices",
            f"there are not exactly {NUM_CHOICES} answer choices",
            NUM_CHOICES,
            NUM_CHOICES,
        ),
        must_be_true("chk_label_ok", "bad_answer_label", f"answer_label is not an integer in 0..{NUM_CHOICES - 1}"),
        must_be_true(
            "chk_object_refs_ok", "bad_object_ref", "a token names an object that is not in the line's objects"
        ),
        leakage_rule(what="question's image"),
    ]
    check = TableCheck(
        name="vcr",
        source="tasks/vcr/*.jsonl",
        frame=frame,
        row_id_column="row_id",
        rules=rules,
        record=lambda i: rows[i][2],
        problems=problems,
    )
    return [validate(check)]
