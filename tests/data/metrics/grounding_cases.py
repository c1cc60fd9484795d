"""Inputs for the RefCOCO+ cross-check: candidate regions, the model's logits over them, a refer box.

Each case is ``{"id", "candidates": [[x1, y1, x2, y2]] * R (pixels), "logits": [float] * R (distinct, so the
chosen region does not depend on how ties are broken), "ref_xywh": [x, y, w, h]}`` (the refer annotation's
box).  The stored outputs next to this file come from the original ViLBERT ``iou`` (README.md); this module
holds no original code.
"""

from __future__ import annotations

import random
from typing import Any

SEED = 11
RANDOM_COUNT = 400


def _random_box(rng: random.Random, width: float, height: float, integer: bool) -> list[float]:
    x1, y1 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
    x2, y2 = rng.uniform(x1, width), rng.uniform(y1, height)
    box = [x1, y1, x2, y2]
    return [float(round(v)) for v in box] if integer else [round(v, 4) for v in box]


def _near(rng: random.Random, box: list[float], jitter: float) -> list[float]:
    """A box like ``box``, each side moved by up to ``jitter`` pixels (kept valid)."""
    x1, y1, x2, y2 = (v + rng.uniform(-jitter, jitter) for v in box)
    return [round(min(x1, x2), 4), round(min(y1, y2), 4), round(max(x1, x2), 4), round(max(y1, y2), 4)]


def _case(index: int, kind: str, candidates: list[list[float]], chosen: int, ref_xywh: list[float]) -> dict:
    logits = [-float(i) for i in range(len(candidates))]
    logits[0], logits[chosen] = logits[chosen], logits[0]  # the highest logit (0.0) on the chosen region
    return {"id": f"{kind}-{index}", "candidates": candidates, "logits": logits, "ref_xywh": ref_xywh}


def grounding_cases() -> list[dict[str, Any]]:
    """Hand-built edge cases, then random ones near and far from the ground truth."""
    cases: list[dict[str, Any]] = []
    hand = [
        # (kind, candidate boxes, chosen, refer xywh)
        ("exactly-half", [[0, 0, 9, 9], [50, 50, 60, 60]], 0, [0, 0, 4, 9]),  # +1: 50 / 100 = 0.5, not > 0.5
        ("just-above-half", [[0, 0, 9, 9]], 0, [0, 0, 5, 9]),  # +1: 60 / 100
        ("identical", [[10, 10, 20, 20]], 0, [10, 10, 10, 10]),
        ("touching-edge", [[0, 0, 10, 10]], 0, [10, 0, 10, 10]),  # +1: one shared column of pixels
        ("touching-corner", [[0, 0, 10, 10]], 0, [10, 10, 5, 5]),
        ("apart", [[0, 0, 10, 10]], 0, [20, 20, 5, 5]),
        ("point-box", [[5, 5, 5, 5]], 0, [5, 5, 0, 0]),  # +1: area 1 each, IoU 1
        ("line-box", [[0, 0, 10, 0]], 0, [0, 0, 10, 0]),
        ("contained", [[0, 0, 99, 99], [20, 20, 79, 79]], 0, [20, 20, 59, 59]),
        ("contains", [[0, 0, 99, 99], [20, 20, 79, 79]], 1, [0, 0, 99, 99]),
        ("fractional", [[10.5, 0.25, 20.5, 10.75]], 0, [15.5, 0.25, 10.0, 10.5]),
        ("large-image", [[0, 0, 1279.5, 959.5], [640, 480, 1280, 960]], 1, [600.12, 450.5, 679.88, 509.5]),
        ("all-candidates-hit", [[0, 0, 10, 10], [0, 0, 10, 11], [1, 0, 10, 10]], 2, [0, 0, 10, 10]),
        ("no-candidate-hits", [[0, 0, 1, 1], [50, 50, 51, 51]], 0, [20, 20, 5, 5]),
    ]
    for kind, candidates, chosen, ref in hand:
        cases.append(_case(len(cases), kind, [[float(v) for v in b] for b in candidates], chosen, ref))
    rng = random.Random(SEED)
    for _ in range(RANDOM_COUNT):
        width, height = rng.choice([(640.0, 480.0), (500.0, 375.0), (40.0, 30.0), (12.0, 9.0)])
        integer = rng.random() < 0.4
        x, y = round(rng.uniform(0, width - 1), 2), round(rng.uniform(0, height - 1), 2)
        w, h = round(rng.uniform(0, width - x), 2), round(rng.uniform(0, height - y), 2)
        ref = [float(round(v)) for v in (x, y, w, h)] if integer else [x, y, w, h]
        truth = [ref[0], ref[1], ref[0] + ref[2], ref[1] + ref[3]]
        candidates = [
            _near(rng, truth, rng.choice([0.5, 2.0, 8.0, 30.0])) if rng.random() < 0.5
            else _random_box(rng, width, height, integer)
            for _ in range(rng.randrange(1, 12))
        ]  # fmt: skip
        cases.append(_case(len(cases), "random", candidates, rng.randrange(len(candidates)), ref))
    return cases
