"""The VQA v2 suites: questions (ids, text, image, split leakage, annotated) and annotations (answers).

Files: ``tasks/vqa/v2_OpenEnded_mscoco_<split>_questions.json`` and ``v2_mscoco_<split>_annotations.json``
(the official names; ``<split>`` such as ``train2014`` is the split label used for the leakage check).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from components.validation.captions import stripped_lengths, text_length_rules
from components.validation.engine import TableCheck, TableOutcome, between, id_rules, must_be_true, not_null
from components.validation.limits import ValidationLimits
from components.validation.refs import (
    ImageIndex,
    add_image_columns,
    add_one_split_column,
    image_rules,
    leakage_rule,
    nullable,
)
from components.validation.taskfiles import Validate, as_list, field, load_json

_QUESTIONS = re.compile(r"^v2_OpenEnded_mscoco_(?P<split>.+)_questions\.json$")


def _text_id(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else str(value)


def validate_vqa(root: Path, images: ImageIndex, limits: ValidationLimits, validate: Validate) -> list[TableOutcome]:
    """Validate every VQA split found under ``tasks/vqa`` (nothing when the folder is absent)."""
    folder = root / "tasks" / "vqa"
    if not folder.is_dir():
        return []
    splits = sorted(m["split"] for p in folder.iterdir() if (m := _QUESTIONS.match(p.name)))
    questions: list[tuple[str, Any]] = []
    annotations: list[tuple[str, Any]] = []
    problems: list[str] = []
    annotated: dict[str, set[str]] = {}  # split -> question ids with an annotation (splits with an annotation file)
    for split in splits:
        qs, bad = load_json(folder / f"v2_OpenEnded_mscoco_{split}_questions.json", "questions")
        problems += bad
        questions += [(split, q) for q in qs or []]
        ann_path = folder / f"v2_mscoco_{split}_annotations.json"
        if ann_path.is_file():
            anns, bad = load_json(ann_path, "annotations")
            problems += bad
            annotations += [(split, a) for a in anns or []]
            annotated[split] = {t for a in anns or [] if (t := _text_id(field(a, "question_id"))) is not None}
    if not splits:
        problems.append("tasks/vqa has no v2_OpenEnded_mscoco_<split>_questions.json file")

    q_outcome = validate(_questions_check(questions, annotated, images, limits, problems))
    outcomes = [q_outcome]
    if annotations:
        outcomes.append(validate(_annotations_check(annotations, q_outcome, limits)))
    return outcomes


def _questions_check(
    rows: list[tuple[str, Any]],
    annotated: dict[str, set[str]],
    images: ImageIndex,
    limits: ValidationLimits,
    problems: list[str],
) -> TableCheck:
    frame = pd.DataFrame(
        {
            "question_id": nullable(_text_id(field(q, "question_id")) for _, q in rows),
            "image_id": nullable(field(q, "image_id") for _, q in rows),
            "question": nullable(field(q, "question") for _, q in rows),
            "split": nullable(s for s, _ in rows),
        }
    )
    add_image_columns(frame, [images.resolve(i) for i in frame["image_id"]], images)
    frame["chk_question_chars"] = stripped_lengths(frame["question"])
    frame["chk_annotated"] = nullable(
        None if s not in annotated or q is None else q in annotated[s]
        for s, q in zip(frame["split"], frame["question_id"], strict=True)
    )
    add_one_split_column(frame, "chk_image", "split")
    rules = [
        *id_rules("question_id"),
        not_null("image_id"),
        not_null("question"),
        *text_length_rules("chk_question_chars", "question", limits),
        *image_rules("question"),
        must_be_true("chk_annotated", "missing_annotation", "the question has no annotation in its split's file"),
        leakage_rule(what="question's image"),
    ]
    return TableCheck(
        name="vqa_questions",
        source="tasks/vqa/v2_OpenEnded_mscoco_*_questions.json",
        frame=frame,
        row_id_column="question_id",
        rules=rules,
        record=lambda i: rows[i][1],
        problems=problems,
    )


def _annotations_check(rows: list[tuple[str, Any]], questions: TableOutcome, limits: ValidationLimits) -> TableCheck:
    qframe = questions.check.frame
    q_image = {q: i for q, i in zip(qframe["question_id"], qframe["image_id"], strict=True) if q is not None}
    q_accepted = questions.accepted_ids()
    frame = pd.DataFrame(
        {
            "question_id": nullable(_text_id(field(a, "question_id")) for _, a in rows),
            "image_id": nullable(field(a, "image_id") for _, a in rows),
            "multiple_choice_answer": nullable(field(a, "multiple_choice_answer") for _, a in rows),
            "num_answers": nullable(len(as_list(field(a, "answers"))) for _, a in rows),
            "split": nullable(s for s, _ in rows),
        }
    )
    known = [q is not None and q in q_image for q in frame["question_id"]]
    frame["chk_question_known"] = nullable(known)
    frame["chk_question_accepted"] = nullable(
        q in q_accepted if k else None for q, k in zip(frame["question_id"], known, strict=True)
    )
    frame["chk_same_image"] = nullable(
        str(q_image[q]) == str(i) if k and i is not None else None
        for q, i, k in zip(frame["question_id"], frame["image_id"], known, strict=True)
    )
    frame["chk_answer_chars"] = stripped_lengths(frame["multiple_choice_answer"])
    rules = [
        *id_rules("question_id"),
        must_be_true("chk_question_known", "unknown_question", "the annotation's question_id is in no questions file"),
        must_be_true("chk_question_accepted", "question_quarantined", "the annotation's question was quarantined"),
        must_be_true("chk_same_image", "image_mismatch", "image_id differs from the question's image_id"),
        between("num_answers", "no_answers", "the annotation has no answers", min_value=1),
        not_null("multiple_choice_answer", "missing_answer", "multiple_choice_answer is empty"),
        *text_length_rules("chk_answer_chars", "answer", limits),
    ]
    return TableCheck(
        name="vqa_annotations",
        source="tasks/vqa/v2_mscoco_*_annotations.json",
        frame=frame,
        row_id_column="question_id",
        rules=rules,
        record=lambda i: rows[i][1],
    )
