"""Inputs for the VCR cross-check: sets of questions with answer and rationale scores and labels.

Each set is ``{"id", "answer_scores": [[float] * 4] * N, "answer_labels": [int] * N, "rationale_scores",
"rationale_labels"}``.  Small integer scores make ties between choices common (the original breaks them with
``numpy.argmax``, to the lowest index).  Outputs of the original script are stored next to this file
(README.md); this module holds no original code.
"""

from __future__ import annotations

import random
from typing import Any

SEED = 11


def _scores(rng: random.Random, style: str) -> list[float]:
    if style == "ties":
        return [float(rng.randrange(0, 3)) for _ in range(4)]
    if style == "constant":
        return [0.5] * 4
    return [round(rng.gauss(0.0, 2.0), 6) for _ in range(4)]


def vcr_sets() -> list[dict[str, Any]]:
    """250 single-question sets (every outcome per question) and 50 sets of 2 to 60 questions."""
    rng = random.Random(SEED)
    sets = []
    for index in range(300):
        size = 1 if index < 250 else rng.randrange(2, 61)
        style = rng.choice(["ties", "logits", "logits", "constant"] if index % 10 else ["constant"])
        sets.append(
            {
                "id": f"set-{index}",
                "answer_scores": [_scores(rng, style) for _ in range(size)],
                "answer_labels": [rng.randrange(4) for _ in range(size)],
                "rationale_scores": [_scores(rng, style) for _ in range(size)],
                "rationale_labels": [rng.randrange(4) for _ in range(size)],
            }
        )
    return sets
