"""The RefCOCO+ suites: ``instances.json`` (COCO boxes) and ``refs(unc).json`` (referring expressions).

A ref must point at an accepted instance annotation of the same image, carry at least one sentence of
acceptable length, and its image must not appear under two splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from components.validation.captions import text_length_rules
from components.validation.engine import TableCheck, TableOutcome, between, id_rules, must_be_true, not_null
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
from components.validation.taskfiles import Validate, as_list, field, instances_check, load_json

REF_SPLITS = ("train", "val", "testA", "testB", "test")
REFS_FILE = "refs(unc).json"


def validate_refcoco(
    root: Path, images: ImageIndex, limits: ValidationLimits, validate: Validate
) -> list[TableOutcome]:
    """Validate ``tasks/refcoco+`` (nothing when the folder is absent)."""
    folder = root / "tasks" / "refcoco+"
    if not folder.is_dir():
        return []
    instances = instances_check("refcoco+_instances", folder / "instances.json", root, images, limits)
    outcomes = [validate(instances)] if instances is not None else []
    problems = [] if instances is not None else ["tasks/refcoco+/instances.json not found"]
    refs, bad = load_json(folder / REFS_FILE)
    if not bad and not isinstance(refs, list):
        bad = [f"{REFS_FILE} is not a list of refs"]
    outcomes.append(validate(_refs_check(refs if not bad else [], outcomes, images, limits, problems + bad)))
    return outcomes


def _sentences(ref: Any) -> list[Any]:
    return [field(s, "raw") or field(s, "sent") for s in as_list(field(ref, "sentences"))]


def _refs_check(
    refs: list[Any], instances: list[TableOutcome], images: ImageIndex, limits: ValidationLimits, problems: list[str]
) -> TableCheck:
    ann_image: dict[str, Any] = {}
    ann_accepted: set[str] = set()
    if instances:
        iframe = instances[0].check.frame
        ann_image = {str(a): i for a, i in zip(iframe["id"], iframe["image_id"], strict=True) if a is not None}
        ann_accepted = instances[0].accepted_ids()
    stats = [text_stats(_sentences(r)) for r in refs]
    frame = pd.DataFrame(
        {
            "ref_id": nullable(field(r, "ref_id") for r in refs),
            "ann_id": nullable(field(r, "ann_id") for r in refs),
            "image_id": nullable(field(r, "image_id") for r in refs),
            "split": nullable(field(r, "split") for r in refs),
            "num_sentences": nullable(len(as_list(field(r, "sentences"))) for r in refs),
            "chk_shortest_chars": nullable(s[0] for s in stats),
            "chk_longest_chars": nullable(s[1] for s in stats),
        }
    )
    # image_id only: refs file names carry an annotation suffix (..._000000581857_16.jpg), not a plain image name
    add_image_columns(frame, [images.resolve(i) for i in frame["image_id"]], images)
    known = [a is not None and str(a) in ann_image for a in frame["ann_id"]]
    frame["chk_ann_known"] = nullable(known)
    frame["chk_ann_accepted"] = nullable(
        str(a) in ann_accepted if k else None for a, k in zip(frame["ann_id"], known, strict=True)
    )
    frame["chk_ann_same_image"] = nullable(
        str(ann_image[str(a)]) == str(i) if k and i is not None else None
        for a, i, k in zip(frame["ann_id"], frame["image_id"], known, strict=True)
    )
    add_one_split_column(frame, "chk_image", "split")
    rules = [
        *id_rules("ref_id"),
        not_null("image_id"),
        *image_rules("ref"),
        not_null("ann_id"),
        must_be_true("chk_ann_known", "unknown_annotation", "ann_id is not an annotation of instances.json"),
        must_be_true("chk_ann_accepted", "annotation_quarantined", "the ref's instance annotation was quarantined"),
        must_be_true("chk_ann_same_image", "image_mismatch", "the annotation belongs to another image"),
        between("num_sentences", "no_sentences", "the ref has no sentences", min_value=1),
        *text_length_rules("chk_shortest_chars", "expression", limits, longest="chk_longest_chars"),
        *split_rules(REF_SPLITS),
        leakage_rule(what="ref's image"),
    ]
    return TableCheck(
        name="refcoco+_refs",
        source=f"tasks/refcoco+/{REFS_FILE}",
        frame=frame,
        row_id_column="ref_id",
        rules=rules,
        record=lambda i: refs[i],
        problems=problems,
    )
