"""Losses of the pretraining proxy tasks and of the downstream tasks.

Conventions (as the reference data loaders): a label < 0 means "not supervised".  Unlike the reference,
no loss is ever NaN: a batch without a single supervised item contributes 0 (and no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_mean_ce(logits: Tensor, labels: Tensor) -> Tensor:
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep])


def masked_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the vocabulary, averaged over supervised tokens.

    ``logits`` (N, V) for N supervised positions (or (B, T, V) for all), ``labels`` matching (N,) / (B, T).
    """
    return _masked_mean_ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def alignment_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-caption alignment: (B, 2) logits, labels 0 = caption matches, 1 = random caption, -1 = ignore."""
    return _masked_mean_ce(logits, labels)


def masked_region_kl_loss(logits: Tensor, targets: Tensor, supervised: Tensor) -> Tensor:
    """KL(target || softmax(logits)) summed over classes, averaged over the masked regions of the batch.

    ``logits`` and ``targets`` (N, C) at the N masked regions (any leading shape works), ``supervised`` the
    number of masked regions.  This is the reference normalisation (per region, over the whole batch, not
    per class and not per example), except that an empty batch gives 0 instead of NaN.
    """
    kl = F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="sum")
    return kl / max(int(supervised), 1)


def masked_region_regression_loss(predictions: Tensor, features: Tensor, supervised: Tensor) -> Tensor:
    """Squared error to the original region features, averaged over masked regions x feature dims."""
    se = F.mse_loss(predictions, features, reduction="sum")
    return se / max(int(supervised) * features.shape[-1], 1)


def vqa_soft_bce_loss(logits: Tensor, soft_scores: Tensor) -> Tensor:
    """VQA: binary cross-entropy against soft answer scores (B, A) in [0, 1], scaled by A as in the
    reference (mean over answers x number of answers = sum over answers, mean over the batch)."""
    return F.binary_cross_entropy_with_logits(logits, soft_scores) * soft_scores.shape[1]


def multiple_choice_loss(pair_logits: Tensor, correct: Tensor) -> Tensor:
    """VCR-style Q->A and retrieval: one logit per (question, candidate) pair, (B, K); softmax across the K
    candidates; ``correct`` (B,) index of the right one."""
    return F.cross_entropy(pair_logits, correct)


def grounding_loss(region_logits: Tensor, targets: Tensor, region_mask: Tensor) -> Tensor:
    """RefCOCO+: (B, R) region logits against (B, R) non-negative targets (e.g. 1 for regions with
    IoU >= 0.5 to the referred box), normalised per example; padded regions are excluded."""
    logits = region_logits.masked_fill(~region_mask.bool(), torch.finfo(region_logits.dtype).min)
    totals = targets.sum(-1, keepdim=True)
    has_target = totals.squeeze(-1) > 0
    if not bool(has_target.any()):
        return region_logits.sum() * 0.0
    dist = targets[has_target] / totals[has_target]
    return -(dist * F.log_softmax(logits[has_target], dim=-1)).sum(-1).mean()
