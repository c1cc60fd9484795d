"""Image-text retrieval recall: R@1 / R@5 / R@10 and median rank over the whole test gallery.

Followed: ``eval_retrieval.py`` of github.com/facebookresearch/vilbert-multi-task at commit
``f22b84a9918a9aea2106e14ac1f6b32ad71492e3`` (caption-based image retrieval on the Flickr30k 1k-image test
split: 5,000 captions, five per image, each ranked against all 1,000 images).  Definition: Karpathy &
Fei-Fei, CVPR 2015 (the split, R@K, median rank), as used by Lu et al., "ViLBERT", NeurIPS 2019, section 4.
Our code; ``tests/data/metrics/`` holds cases ranked by the original's ranking code (README there).

- Image retrieval (the ViLBERT task): each caption is a query, every image of the gallery a candidate, and
  exactly one image is correct.  Text retrieval (extra): each image is a query, every caption a candidate,
  and any of its captions (five in Flickr30k) counts; images without captions (e.g. distractors) are not
  queries but stay in the image gallery.
- ``scores`` is [num_captions, num_images]: higher means a better match.  Ranks are 1-based.
- Tie rule (pessimistic): the rank of a query is 1 + the number of WRONG candidates scored at least as high
  as its best correct candidate.  A tie therefore never helps the model: a constant scorer gets rank =
  gallery size, not a lucky R@1.  (Sort-based code breaks ties by index order instead, which can flatter it.)
  The original ranks with ``numpy.argsort`` of the negated scores, whose order among equal scores depends on
  numpy's sort algorithm; without ties the two agree exactly (the stored cases have none).
- R@K = share of queries with rank <= K; median rank = ``floor(numpy.median(ranks))`` (the original's
  ``floor(median(0-based ranks) + 1)``: with an even number of queries and two different middle ranks, the
  lower one); mean rank = the mean of the ranks.
- Chance (the ``chance`` key: R@K as a fraction like the recalls, and the mean rank) is that of a uniformly
  random ranking of the gallery: for image retrieval ``R@K = K / num_images`` and mean rank
  ``(num_images + 1) / 2``; for text retrieval, an image with m of the M captions, ``1 - C(M - m, K) / C(M, K)``
  and ``(M + 1) / (m + 1)``, averaged over the query images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from components.metrics._arrays import as_array, as_index_array

#: The cut-offs ViLBERT reports.
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _inputs(scores: Any, caption_image: Any) -> tuple[np.ndarray, np.ndarray]:
    matrix = as_array(scores, name="scores", ndim=2)
    if 0 in matrix.shape:
        raise ValueError(f"scores: empty score matrix {matrix.shape}; expected [num_captions, num_images]")
    owners = as_index_array(caption_image, name="caption_image", upper=matrix.shape[1])
    if owners.shape[0] != matrix.shape[0]:
        raise ValueError(f"caption_image: expected one image index per caption ({matrix.shape[0]}), got {owners.size}")
    return matrix, owners


def image_retrieval_ranks(scores: Any, caption_image: Any) -> np.ndarray:
    """Rank (1-based, pessimistic ties) of each caption's correct image: int64 [num_captions].

    ``scores``: [num_captions, num_images]; ``caption_image``: [num_captions], the index of each caption's image.
    """
    return _image_ranks(*_inputs(scores, caption_image))


def _image_ranks(matrix: np.ndarray, owners: np.ndarray) -> np.ndarray:
    correct = matrix[np.arange(matrix.shape[0]), owners]
    # The correct image itself is counted by ">=", which supplies the "1 +".
    return (matrix >= correct[:, None]).sum(axis=1).astype(np.int64)


def text_retrieval_ranks(scores: Any, caption_image: Any) -> tuple[np.ndarray, np.ndarray]:
    """For each image with at least one caption: (image indices int64 [Q], rank of its best caption int64 [Q]).

    Rank = 1 + number of other images' captions scored at least as high as the image's best own caption.
    """
    return _text_ranks(*_inputs(scores, caption_image))


def _text_ranks(matrix: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    by_image = matrix.T  # [num_images, num_captions]
    own = owners[None, :] == np.arange(matrix.shape[1])[:, None]
    queries = np.flatnonzero(own.any(axis=1))
    by_image, own = by_image[queries], own[queries]
    best_own = np.where(own, by_image, -np.inf).max(axis=1)
    ranks = 1 + ((by_image >= best_own[:, None]) & ~own).sum(axis=1)
    return queries.astype(np.int64), ranks.astype(np.int64)


def recall_summary(ranks: Any, ks: Sequence[int] = DEFAULT_KS, *, gallery_size: int | None = None) -> dict[str, Any]:
    """``{"recall_at_<k>": share of ranks <= k for each k, "median_rank", "mean_rank", "num_queries"}``.

    With ``gallery_size`` (one correct candidate among that many), also ``"chance": {"recall_at_<k>": k /
    gallery_size, "mean_rank": (gallery_size + 1) / 2}``.
    """
    values = as_array(ranks, name="ranks", ndim=1)
    if values.size == 0:
        raise ValueError("ranks: no queries")
    if values.min() < 1:
        raise ValueError("ranks: ranks are 1-based")
    bad_ks = [k for k in ks if not isinstance(k, (int, np.integer)) or k < 1]
    if not ks or bad_ks:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    summary: dict[str, Any] = {f"recall_at_{int(k)}": float((values <= k).mean()) for k in ks}
    summary["median_rank"] = float(np.floor(np.median(values)))
    summary["mean_rank"] = float(values.mean())
    summary["num_queries"] = int(values.size)
    if gallery_size is not None:
        if gallery_size < 1 or values.max() > gallery_size:
            raise ValueError(f"gallery_size {gallery_size} is smaller than a rank ({values.max()})")
        summary["chance"] = _chance(np.array([gallery_size]), np.array([1]), ks)
    return summary


def _hit_probability(candidates: int, correct: int, k: int) -> float:
    if k >= candidates:
        return 1.0
    total = math.comb(candidates, k)
    return (total - math.comb(candidates - correct, k)) / total


def _chance(candidates: np.ndarray, correct: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """R@K and mean rank of a uniformly random ranking: query q has ``correct[q]`` right candidates among
    ``candidates[q]``; its rank is the position of the first right one."""
    pairs, weights = np.unique(np.stack([candidates, correct], axis=1), axis=0, return_counts=True)
    chance: dict[str, float] = {}
    for k in (int(k) for k in ks):
        # P(a right candidate in the top k) = 1 - C(n - m, k) / C(n, k), in integers until the one division
        hit = [_hit_probability(int(n), int(m), k) for n, m in pairs]
        chance[f"recall_at_{k}"] = float(np.average(hit, weights=weights))
    chance["mean_rank"] = float(np.average((pairs[:, 0] + 1) / (pairs[:, 1] + 1), weights=weights))
    return chance


def retrieval_scores(scores: Any, caption_image: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Image retrieval (caption -> image, the ViLBERT metric) and text retrieval (image -> caption) summaries.

    ``scores``: [num_captions, num_images] over the full test gallery; ``caption_image``: [num_captions] image
    index of each caption.  Returns ``{"image_retrieval": recall_summary + {"ranks": [int] * num_captions,
    "chance"}, "text_retrieval": recall_summary + {"ranks": [int] * Q, "image_index": [int] * Q, "chance"},
    "num_captions", "num_images", "chance"}`` (Q = images with at least one caption; the top-level ``chance``
    is image retrieval's, the ViLBERT task).
    """
    matrix, owners = _inputs(scores, caption_image)
    image_ranks = _image_ranks(matrix, owners)
    query_images, text_ranks = _text_ranks(matrix, owners)
    num_captions, num_images = matrix.shape
    image_chance = _chance(np.full(num_captions, num_images), np.ones(num_captions, dtype=np.int64), ks)
    own_captions = np.bincount(owners, minlength=num_images)[query_images]
    text_chance = _chance(np.full(query_images.size, num_captions), own_captions, ks)
    return {
        "image_retrieval": {**recall_summary(image_ranks, ks), "ranks": image_ranks.tolist(), "chance": image_chance},
        "text_retrieval": {
            **recall_summary(text_ranks, ks),
            "ranks": text_ranks.tolist(),
            "image_index": query_images.tolist(),
            "chance": text_chance,
        },
        "num_captions": int(num_captions),
        "num_images": int(num_images),
        "chance": image_chance,
    }
