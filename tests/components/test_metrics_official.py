"""Our metrics against outputs of the original evaluation code, case for case.

The cases and the outputs live in tests/data/metrics/ (its README says which original file, at which commit,
produced them and how).  VQA: every adversarial case and 10,000 seeded random cases against the official
``vqaEval.py``.  VCR, RefCOCO+ and retrieval: cases run through the original ViLBERT evaluation code.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from components.metrics import (
    box_iou,
    grounding_scores,
    retrieval_scores,
    vcr_q2ar_scores,
    vcr_scores,
    vqa_accuracy,
    vqa_scores,
    xywh_to_xyxy,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "metrics"
TOLERANCE = 1e-9


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"metrics_data_{name}", DATA / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="ascii").splitlines() if line]


# --- VQA


VQA_CASES = _module("vqa_cases")
ADVERSARIAL = _jsonl("vqa_official_adversarial.jsonl")


def test_the_stored_adversarial_cases_are_the_generators() -> None:
    stored = [{k: v for k, v in case.items() if k != "official_percent"} for case in ADVERSARIAL]
    assert stored == VQA_CASES.adversarial_cases()
    assert len(stored) >= 500


def _disagreements(cases: list[dict[str, Any]], official_percent: list[float]) -> list[tuple[Any, ...]]:
    wrong = []
    for case, official in zip(cases, official_percent, strict=True):
        ours = 100 * vqa_accuracy(case["prediction"], case["answers"])
        if abs(ours - official) > TOLERANCE:
            wrong.append((case["id"], case["prediction"], case["answers"], ours, official))
    return wrong


def test_vqa_accuracy_agrees_with_the_official_script_on_every_adversarial_case() -> None:
    wrong = _disagreements(ADVERSARIAL, [case["official_percent"] for case in ADVERSARIAL])
    assert not wrong, f"{len(wrong)} of {len(ADVERSARIAL)} disagree, e.g. {wrong[:3]}"


def test_vqa_accuracy_agrees_with_the_official_script_on_10000_random_cases() -> None:
    stored = json.loads((DATA / "vqa_official_random.json").read_text(encoding="ascii"))
    cases = list(VQA_CASES.random_cases(stored["seed"], stored["count"]))
    assert stored["count"] == len(stored["official_percent"]) == 10_000
    assert VQA_CASES.inputs_digest(cases) == stored["inputs_sha256"], "the generator no longer makes these cases"
    wrong = _disagreements(cases, stored["official_percent"])
    assert not wrong, f"{len(wrong)} of {len(cases)} disagree, e.g. {wrong[:3]}"


def test_vqa_scores_per_question_is_the_same_official_accuracy() -> None:
    cases = ADVERSARIAL[:300]
    annotations = [{"question_id": i, "answers": c["answers"], "answer_type": "other"} for i, c in enumerate(cases)]
    scores = vqa_scores({i: c["prediction"] for i, c in enumerate(cases)}, annotations)
    np.testing.assert_allclose(
        [100 * scores["per_question"][i] for i in range(len(cases))], [c["official_percent"] for c in cases],
        rtol=0, atol=TOLERANCE,
    )  # fmt: skip
    assert 0.0 <= scores["chance"] <= 1.0


@pytest.mark.parametrize(
    ("rule", "prediction", "answers", "official_percent"),
    [
        ("identical humans: raw prediction, case kept", "Yes", ["yes"] * 10, 0.0),
        ("identical humans: raw prediction, no number words", "two", ["two"] * 10, 100.0),
        ("identical humans: no punctuation step", "yes.", ["yes"] * 10, 0.0),
        ("hyphen is in the script's list", "red-white", ["red white"] * 3 + ["blue"] * 7, 90.0),
        ("apostrophe is not", "don't", ["don t"] * 3 + ["blue"] * 7, 0.0),
        ("mixed humans are normalised too", "2", ["two"] * 4 + ["three"] * 6, 100.0),
    ],
)
def test_each_rule_that_used_to_differ(rule: str, prediction: str, answers: list[str], official_percent: float) -> None:
    # Each row is also in the stored official output (the search below fails if it is not).
    match = [c for c in ADVERSARIAL if c["prediction"] == prediction and c["answers"] == answers]
    assert match, f"{rule}: no official output stored for this case"
    assert match[0]["official_percent"] == official_percent
    assert 100 * vqa_accuracy(prediction, answers) == pytest.approx(official_percent, abs=TOLERANCE)


# --- VCR: script/VCR_Q_AR_evaluation.py


VCR_SETS = _jsonl("vcr_vilbert.jsonl")


def test_the_stored_vcr_sets_are_the_generators() -> None:
    assert [{k: v for k, v in s.items() if k != "official"} for s in VCR_SETS] == _module("vcr_cases").vcr_sets()


@pytest.mark.parametrize("case", VCR_SETS, ids=lambda case: case["id"])
def test_vcr_accuracies_agree_with_the_original_script(case: dict[str, Any]) -> None:
    result = vcr_q2ar_scores(
        case["answer_scores"], case["answer_labels"], case["rationale_scores"], case["rationale_labels"]
    )
    official = case["official"]
    assert result["q2a"]["accuracy"] == pytest.approx(official["Q_A_accuracy"], abs=TOLERANCE)
    assert result["qa2r"]["accuracy"] == pytest.approx(official["QA_R_accuracy"], abs=TOLERANCE)
    assert result["q2ar"]["accuracy"] == pytest.approx(official["Q_AR_accuracy"], abs=TOLERANCE)
    assert vcr_scores(case["answer_scores"], case["answer_labels"])["accuracy"] == result["q2a"]["accuracy"]


# --- RefCOCO+: vilbert/datasets/refer_expression_dataset.py iou + task_utils.py V-logit


GROUNDING = _jsonl("grounding_vilbert.jsonl")


def test_the_stored_grounding_cases_are_the_generators() -> None:
    stored = [{k: v for k, v in c.items() if k != "official"} for c in GROUNDING]
    assert stored == _module("grounding_cases").grounding_cases()


def test_grounding_agrees_with_the_original_iou_and_decision_case_for_case() -> None:
    chosen = [int(np.argmax(c["logits"])) for c in GROUNDING]
    assert chosen == [c["official"]["chosen"] for c in GROUNDING]
    result = grounding_scores(
        [c["candidates"][i] for c, i in zip(GROUNDING, chosen, strict=True)],
        [xywh_to_xyxy(c["ref_xywh"]) for c in GROUNDING],
        candidate_boxes=[c["candidates"] for c in GROUNDING],
    )
    np.testing.assert_allclose(result["iou"], [c["official"]["iou"] for c in GROUNDING], rtol=0, atol=TOLERANCE)
    assert result["correct"] == [c["official"]["correct"] for c in GROUNDING]
    # chance: the share of each expression's candidates the original would count as correct (IoU > 0.5)
    shares = [np.mean([v > 0.5 for v in c["official"]["candidate_iou"]]) for c in GROUNDING]
    assert result["chance"] == pytest.approx(float(np.mean(shares)), abs=TOLERANCE)
    for case in GROUNDING:  # every candidate's IoU, not only the chosen one's
        truth = np.repeat(xywh_to_xyxy([case["ref_xywh"]]), len(case["candidates"]), axis=0)
        np.testing.assert_allclose(
            box_iou(case["candidates"], truth), case["official"]["candidate_iou"], rtol=0, atol=TOLERANCE
        )


def test_the_continuous_convention_would_disagree_with_the_original() -> None:
    # Why the default is the original's: the old continuous, >= 0.5 rule decides some stored cases otherwise.
    chosen = [c["candidates"][int(np.argmax(c["logits"]))] for c in GROUNDING]
    truths = [xywh_to_xyxy(c["ref_xywh"]) for c in GROUNDING]
    continuous = grounding_scores(chosen, truths, convention="continuous")["correct"]
    assert sum(a != c["official"]["correct"] for a, c in zip(continuous, GROUNDING, strict=True)) > 0


# --- retrieval: eval_retrieval.py


RETRIEVAL = _jsonl("retrieval_vilbert.jsonl")


def test_the_stored_retrieval_cases_are_the_generators() -> None:
    generated = _module("retrieval_cases").small_cases()
    assert [{k: v for k, v in c.items() if k != "official"} for c in RETRIEVAL if "scores" in c] == generated


@pytest.mark.parametrize("case", RETRIEVAL, ids=lambda case: case["id"])
def test_image_retrieval_agrees_with_the_original_ranking(case: dict[str, Any]) -> None:
    if "scores" in case:
        scores, caption_image = np.array(case["scores"]), np.array(case["caption_image"])
    else:
        scores, caption_image = getattr(_module("retrieval_cases"), case["generator"])()
    result = retrieval_scores(scores, caption_image)["image_retrieval"]
    official = case["official"]
    assert result["ranks"] == [rank + 1 for rank in official["rank0"]]  # the original's ranks are 0-based
    for k in (1, 5, 10):
        assert 100 * result[f"recall_at_{k}"] == pytest.approx(official[f"r{k}"], abs=TOLERANCE)
    assert result["median_rank"] == official["medr"]
    assert result["mean_rank"] == pytest.approx(official["meanr"], abs=TOLERANCE)
