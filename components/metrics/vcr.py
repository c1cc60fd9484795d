"""VCR accuracies: Q->A, QA->R and Q->AR, as the original ViLBERT code computes them.

Followed: ``script/VCR_Q_AR_evaluation.py`` of github.com/facebookresearch/vilbert-multi-task at commit
``f22b84a9918a9aea2106e14ac1f6b32ad71492e3``.  Definition: Zellers et al., "From Recognition to Cognition:
Visual Commonsense Reasoning", CVPR 2019, section 6 (and the leaderboard at visualcommonsense.com).  Our
code; ``tests/data/metrics/`` holds cases scored by the original script (README there).

- Q->A: the chosen answer is the ``argmax`` of the four answer scores; accuracy = share of questions whose
  choice is the labelled answer.  QA->R: the same over the four rationale scores (the rationales are scored
  given the question and the CORRECT answer, as in VCR; that is the data's business, not the metric's).
- Q->AR: a question counts only when both its answer and its rationale are right.
- Ties between choices go to the lowest index (numpy ``argmax``, as the original), so a model that scores
  every choice the same always answers choice 0.
- Chance (the ``chance`` key, a fraction like the accuracies): ``1 / 4`` for Q->A and QA->R, ``1 / 16`` for
  Q->AR (a uniformly random answer and, independently, a uniformly random rationale).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.metrics._arrays import as_array, as_index_array

#: Every VCR question has exactly four answer choices.
NUM_CHOICES = 4


def vcr_predictions(scores: Any) -> np.ndarray:
    """The chosen answer per question: argmax over the choices of ``scores`` [N, 4] (ties: lowest index)."""
    array = as_array(scores, name="scores", ndim=2)
    if array.shape[1] != NUM_CHOICES:
        raise ValueError(f"scores: expected [N, {NUM_CHOICES}] (one score per answer choice), got {array.shape}")
    return array.argmax(axis=1)


def vcr_scores(scores: Any, labels: Any) -> dict[str, Any]:
    """VCR Q->A accuracy of ``scores`` [N, 4] (logits, probabilities, any monotone score) against ``labels`` [N].

    Returns ``{"accuracy": float in [0, 1], "num_questions": N, "predicted": [int] * N, "correct": [bool] * N,
    "chance": 1 / 4}``.  The same function scores QA->R (rationale scores against rationale labels).
    """
    predicted = vcr_predictions(scores)
    if predicted.size == 0:
        raise ValueError("scores: no questions to evaluate")
    gold = as_index_array(labels, name="labels", upper=NUM_CHOICES)
    if gold.shape != predicted.shape:
        raise ValueError(f"labels: expected {predicted.shape[0]} labels (one per question), got {gold.shape[0]}")
    correct = predicted == gold
    return {
        "accuracy": float(correct.mean()),
        "num_questions": int(correct.size),
        "predicted": predicted.tolist(),
        "correct": correct.tolist(),
        "chance": 1.0 / NUM_CHOICES,
    }


def vcr_accuracy(scores: Any, labels: Any) -> float:
    """VCR Q->A accuracy in [0, 1]; see :func:`vcr_scores`."""
    return vcr_scores(scores, labels)["accuracy"]


def vcr_q2ar_scores(answer_scores: Any, answer_labels: Any, rationale_scores: Any, rationale_labels: Any) -> dict:
    """Q->A, QA->R and Q->AR over the same N questions (row i of every input is question i).

    ``answer_scores``, ``rationale_scores``: [N, 4]; ``answer_labels``, ``rationale_labels``: [N].  Returns
    ``{"q2a": vcr_scores(answers), "qa2r": vcr_scores(rationales), "q2ar": {"accuracy", "correct": [bool] * N,
    "chance": 1 / 16}, "num_questions": N}``.
    """
    q2a = vcr_scores(answer_scores, answer_labels)
    qa2r = vcr_scores(rationale_scores, rationale_labels)
    if q2a["num_questions"] != qa2r["num_questions"]:
        raise ValueError(
            f"answers for {q2a['num_questions']} questions but rationales for {qa2r['num_questions']}: "
            "row i of both must be question i"
        )
    both = np.logical_and(q2a["correct"], qa2r["correct"])
    return {
        "q2a": q2a,
        "qa2r": qa2r,
        "q2ar": {"accuracy": float(both.mean()), "correct": both.tolist(), "chance": 1.0 / NUM_CHOICES**2},
        "num_questions": q2a["num_questions"],
    }
