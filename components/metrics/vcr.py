"""VCR Q->A accuracy: the share of questions whose highest-scored answer choice is the correct one.

Source of the definition: Zellers et al., "From Recognition to Cognition: Visual Commonsense Reasoning",
CVPR 2019, section 6 and the leaderboard at visualcommonsense.com (Q->A: pick one of four answer choices;
accuracy = correct / questions; chance is 25 %).  Ties between choices go to the lowest index (numpy
``argmax``), so a model that scores every choice the same always answers choice 0.
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

    Returns ``{"accuracy": float in [0, 1], "num_questions": N, "predicted": [int] * N, "correct": [bool] * N}``.
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
    }


def vcr_accuracy(scores: Any, labels: Any) -> float:
    """VCR Q->A accuracy in [0, 1]; see :func:`vcr_scores`."""
    return vcr_scores(scores, labels)["accuracy"]
