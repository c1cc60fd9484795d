"""Inputs for the retrieval cross-check: caption x image score matrices without ties, five captions per image.

Small cases hold their matrix; ``flickr_1k_scores()`` builds a full Flickr30k-sized one (5,000 captions x
1,000 images) from integer arithmetic, identical on every machine.  Outputs of the original ranking code are
stored next to this file (README.md); this module holds no original code.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

SEED = 11
CAPTIONS_PER_IMAGE = 5


def small_cases() -> list[dict[str, Any]]:
    """40 galleries of 1 to 24 images; each row's scores are distinct (the original breaks ties its own way)."""
    rng = random.Random(SEED)
    cases = []
    for index in range(40):
        num_images = 1 + index if index < 12 else rng.randrange(2, 25)
        caption_image = [i for i in range(num_images) for _ in range(CAPTIONS_PER_IMAGE)]
        strength = rng.choice([0.0, 0.5, 2.0, 5.0])  # how much the correct image stands out
        scores = []
        for owner in caption_image:
            row: list[float] = []
            while len(set(row)) != num_images:
                row = [round(rng.gauss(0.0, 1.0), 6) for _ in range(num_images)]
                row[owner] = round(row[owner] + strength, 6)
            scores.append(row)
        cases.append({"id": f"small-{index}", "scores": scores, "caption_image": caption_image})
    return cases


def flickr_1k_scores() -> tuple[np.ndarray, np.ndarray]:
    """(scores [5000, 1000] float64, caption_image [5000]): pseudo-random integers, no ties within a row.

    Wrong images score ``2 * ((7919 c + 104729 i) mod 1000003)`` (distinct over i: 104729 is invertible modulo
    the prime 1000003), always even; the correct image gets an odd score, pushed up by a caption-dependent
    amount so that ranks spread from 1 to the gallery size.
    """
    captions, images = np.arange(1000 * CAPTIONS_PER_IMAGE), np.arange(1000)
    caption_image = captions // CAPTIONS_PER_IMAGE
    base = (captions[:, None] * 7919 + images[None, :] * 104729) % 1000003
    scores = 2 * base
    boost = (captions * 37) % 11 * 90000
    scores[captions, caption_image] = 2 * np.minimum(base[captions, caption_image] + boost, 1000003) + 1
    return scores.astype(np.float64), caption_image
