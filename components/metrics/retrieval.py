"""Image-text retrieval recall: R@1 / R@5 / R@10 and median rank over the whole test gallery.

Source of the definition: Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments for Generating Image
Descriptions", CVPR 2015 (Flickr30k 1k-image test split, R@K and median rank), as used by Lu et al.,
"ViLBERT", NeurIPS 2019, section 4 (caption-based image retrieval on Flickr30k: R@1, R@5, R@10).

- Image retrieval (the ViLBERT task): each caption is a query, every image of the gallery a candidate, and
  exactly one image is correct.  Text retrieval (extra): each image is a query, every caption a candidate,
  and any of its captions (five in Flickr30k) counts; images without captions (e.g. distractors) are not
  queries but stay in the image gallery.
- ``scores`` is [num_captions, num_images]: higher means a better match.  Ranks are 1-based.
- Tie rule (pessimistic): the rank of a query is 1 + the number of WRONG candidates scored at least as high
  as its best correct candidate.  A tie therefore never helps the model: a constant scorer gets rank =
  gallery size, not a lucky R@1.  (Sort-based code breaks ties by index order instead, which can flatter it.)
- R@K = share of queries with rank <= K; median rank = ``numpy.median`` of the ranks (the mean of the two
  middle ranks when the number of queries is even); mean rank is reported too.
"""

from __future__ import annotations

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


def recall_summary(ranks: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"recall_at_<k>": share of ranks <= k for each k, "median_rank", "mean_rank", "num_queries"}``."""
    values = as_array(ranks, name="ranks", ndim=1)
    if values.size == 0:
        raise ValueError("ranks: no queries")
    if values.min() < 1:
        raise ValueError("ranks: ranks are 1-based")
    bad_ks = [k for k in ks if not isinstance(k, (int, np.integer)) or k < 1]
    if not ks or bad_ks:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    summary: dict[str, float] = {f"recall_at_{int(k)}": float((values <= k).mean()) for k in ks}
    summary["median_rank"] = float(np.median(values))
    summary["mean_rank"] = float(values.mean())
    summary["num_queries"] = int(values.size)
    return summary


def retrieval_scores(scores: Any, caption_image: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Image retrieval (caption -> image, the ViLBERT metric) and text retrieval (image -> caption) summaries.

    ``scores``: [num_captions, num_images] over the full test gallery; ``caption_image``: [num_captions] image
    index of each caption.  Returns ``{"image_retrieval": recall_summary + {"ranks": [int] * num_captions},
    "text_retrieval": recall_summary + {"ranks": [int] * Q, "image_index": [int] * Q}, "num_captions",
    "num_images"}`` (Q = images with at least one caption).
    """
    matrix, owners = _inputs(scores, caption_image)
    image_ranks = _image_ranks(matrix, owners)
    query_images, text_ranks = _text_ranks(matrix, owners)
    return {
        "image_retrieval": {**recall_summary(image_ranks, ks), "ranks": image_ranks.tolist()},
        "text_retrieval": {
            **recall_summary(text_ranks, ks),
            "ranks": text_ranks.tolist(),
            "image_index": query_images.tolist(),
        },
        "num_captions": int(image_ranks.size),
        "num_images": int(matrix.shape[1]),
    }
