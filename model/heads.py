"""Heads on top of the trunk, and the two complete models.

* :class:`ViLBertForPretraining` - masked multimodal modelling (words and regions) and image-caption
  alignment, the paper's proxy tasks.
* :class:`ViLBertForTasks` - the transfer model: one head per downstream task kind, plus the pretraining
  heads (zero-shot retrieval uses the alignment head).  Its parameters line up with the reference's
  ``VILBertForVLTasks`` so official task checkpoints load into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from . import losses
from .config import ViLBertConfig
from .layers import MASK_OFFSET, activation
from .vilbert import InputError, ViLBertModel, ViLBertOutput, fuse


class PredictionTransform(nn.Module):
    """dense -> activation -> LayerNorm, applied before a decoder."""

    def __init__(self, hidden: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = activation(act)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(x)))


class MaskedLanguageHead(nn.Module):
    """Predicts masked words; the decoder matrix is the word-embedding matrix (tied), plus its own bias."""

    def __init__(self, config: ViLBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionTransform(config.text.hidden_size, config.text.hidden_act, config.layer_norm_eps)
        self.word_embeddings = [word_embeddings]  # a list keeps it out of this module's parameters
        self.bias = nn.Parameter(torch.zeros(config.text.vocab_size))

    def forward(self, states: Tensor) -> Tensor:
        """(..., Ht) -> (..., V) vocabulary logits."""
        return nn.functional.linear(self.transform(states), self.word_embeddings[0].weight, self.bias)


class MaskedRegionHead(nn.Module):
    """Predicts, for a masked region, the detector's class distribution (or its feature, for regression).

    As in the reference, the transform uses the TEXT activation function."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.transform = PredictionTransform(config.vision.hidden_size, config.text.hidden_act, config.layer_norm_eps)
        self.decoder = nn.Linear(config.vision.hidden_size, config.vision.target_size)

    def forward(self, states: Tensor) -> Tensor:
        """(..., Hv) -> (..., C) class logits (or predicted features)."""
        return self.decoder(self.transform(states))


class PretrainingHeads(nn.Module):
    """The three proxy-task heads: masked words, masked regions, image-caption alignment."""

    def __init__(self, config: ViLBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.fusion = config.fusion
        self.language = MaskedLanguageHead(config, word_embeddings)
        self.region = MaskedRegionHead(config)
        self.alignment = nn.Linear(config.coattention.hidden_size, 2)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def alignment_logits(self, out: ViLBertOutput) -> Tensor:
        """(B, 2): index 0 = the caption describes the image, 1 = it does not."""
        return self.alignment(self.dropout(fuse(out.pooled_text, out.pooled_vision, self.fusion)))


@dataclass
class PretrainingOutput:
    """Outputs of :class:`ViLBertForPretraining`.  Logit tensors are ``None`` when not computed."""

    alignment_logits: Tensor
    """(B, 2) caption-image alignment logits (0 = match)."""
    text_logits: Tensor | None = None
    """(B, T, V) vocabulary logits at every position (only without labels, or when asked)."""
    region_logits: Tensor | None = None
    """(B, R, C) class logits for every region, region 0 included (only without labels, or when asked)."""
    masked_lm_loss: Tensor | None = None
    """() mean cross-entropy over masked words."""
    masked_region_loss: Tensor | None = None
    """() KL (or MSE) over masked regions, normalised per masked region."""
    alignment_loss: Tensor | None = None
    """() mean cross-entropy of the alignment prediction."""
    trunk: ViLBertOutput | None = None
    """The trunk's outputs."""

    @property
    def loss(self) -> Tensor:
        """Sum of the losses that were computed (the reference sums them with region weight 1)."""
        parts = [x for x in (self.masked_lm_loss, self.masked_region_loss, self.alignment_loss) if x is not None]
        if not parts:
            raise ValueError("no labels were given, so no loss was computed")
        return torch.stack(parts).sum()


class ViLBertForPretraining(nn.Module):
    """ViLBERT with the pretraining heads (reference ``BertForMultiModalPreTraining``)."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.config = config
        self.vilbert = ViLBertModel(config)
        self.heads = PretrainingHeads(config, self.vilbert.text_embeddings.word)
        init_weights(self)

    def forward(
        self,
        input_ids: Tensor,
        features: Tensor,
        boxes: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        region_mask: Tensor | None = None,
        masked_lm_labels: Tensor | None = None,
        region_labels: Tensor | None = None,
        region_targets: Tensor | None = None,
        alignment_labels: Tensor | None = None,
        full_logits: bool = False,
        region_weight: float = 1.0,
    ) -> PretrainingOutput:
        """Without labels: all logits.  With labels: the losses, computing vocabulary and region logits
        only at the supervised positions (the reference computes them everywhere; the losses are equal).

        ``masked_lm_labels`` (B, T): target id, or < 0 where not supervised.
        ``region_labels`` (B, R): 1 where a region was masked and is supervised, anything else otherwise;
        aligned with ALL regions (region 0 included, normally never supervised).
        ``region_targets`` (B, R, C): the detector's class distribution (or the original features).
        ``alignment_labels`` (B,): 0 = matching caption, 1 = random caption, < 0 ignored.
        """
        out = self.vilbert(input_ids, features, boxes, token_type_ids, attention_mask, region_mask)
        result = PretrainingOutput(alignment_logits=self.heads.alignment_logits(out), trunk=out)
        if masked_lm_labels is None or full_logits:
            result.text_logits = self.heads.language(out.text)
        if region_labels is None or full_logits:
            result.region_logits = self.heads.region(out.vision)
        if masked_lm_labels is not None:
            if masked_lm_labels.shape != input_ids.shape:
                raise InputError(
                    f"masked_lm_labels must have shape {tuple(input_ids.shape)}, got {tuple(masked_lm_labels.shape)}"
                )
            where = masked_lm_labels >= 0
            result.masked_lm_loss = losses.masked_lm_loss(self.heads.language(out.text[where]), masked_lm_labels[where])
        if region_labels is not None:
            result.masked_region_loss = region_weight * self._region_loss(out, region_labels, region_targets)
        if alignment_labels is not None:
            result.alignment_loss = losses.alignment_loss(result.alignment_logits, alignment_labels)
        return result

    def _region_loss(self, out: ViLBertOutput, labels: Tensor, targets: Tensor | None) -> Tensor:
        if targets is None:
            raise InputError("region_labels were given without region_targets")
        if labels.shape != out.vision.shape[:2] or targets.shape[:2] != out.vision.shape[:2]:
            raise InputError(
                f"region_labels {tuple(labels.shape)} and region_targets {tuple(targets.shape)} "
                f"must be aligned with the {out.vision.shape[1]} input regions"
            )
        where = labels == 1
        logits = self.heads.region(out.vision[where])  # (N, C) at masked regions only
        count = where.sum()
        if self.config.region_objective == "regression":
            return losses.masked_region_regression_loss(logits, targets[where].to(logits.dtype), count)
        return losses.masked_region_kl_loss(logits, targets[where].to(logits.dtype), count)


class AnswerHead(nn.Module):
    """VQA: 2-layer MLP on the fused vector -> answer logits.

    Weight-normalised linears (norm over the whole matrix) and ReLU, as the reference ``SimpleClassifier``."""

    def __init__(self, in_size: int, num_answers: int, dropout: float = 0.5):
        super().__init__()
        self.hidden = weight_norm(nn.Linear(in_size, 2 * in_size), dim=None)  # type: ignore[arg-type]
        self.dropout = nn.Dropout(dropout)
        self.out = weight_norm(nn.Linear(2 * in_size, num_answers), dim=None)  # type: ignore[arg-type]

    def forward(self, fused: Tensor) -> Tensor:
        return self.out(self.dropout(torch.relu(self.hidden(fused))))  # (B, A)


@dataclass
class TaskOutput:
    """Outputs of :class:`ViLBertForTasks`.  Each is ``None`` when its head was not requested."""

    answer_logits: Tensor | None = None
    """(B, A) VQA answer logits."""
    pair_logit: Tensor | None = None
    """(B, 1) score of this (text, image) pair: multiple choice and retrieval."""
    alignment_logits: Tensor | None = None
    """(B, 2) the pretraining alignment head (0 = match): zero-shot retrieval."""
    region_logits: Tensor | None = None
    """(B, R, 1) grounding score per region; padded regions get -10000."""
    region_class_logits: Tensor | None = None
    """(B, R, C) the masked-region head on every region."""
    token_class_logits: Tensor | None = None
    """(B, T, V) the masked-language head on every token."""
    token_logits: Tensor | None = None
    """(B, T, 1) a score per token (no padding mask, as the reference)."""
    trunk: ViLBertOutput | None = None


TASK_HEADS = ("answer", "pair", "alignment", "region", "region_class", "token_class", "token")


class ViLBertForTasks(nn.Module):
    """ViLBERT with the transfer heads (reference ``VILBertForVLTasks``).

    Which head serves which task: VQA -> ``answer``; VCR-style multiple choice and retrieval -> ``pair``
    (one logit per pair, softmax across candidates); RefCOCO+ -> ``region``; zero-shot retrieval ->
    ``alignment``.  Pass ``heads=`` to compute only what a task needs.
    """

    def __init__(self, config: ViLBertConfig, num_answers: int):
        super().__init__()
        self.config = config
        c = config.coattention.hidden_size
        self.vilbert = ViLBertModel(config)
        self.pretraining = PretrainingHeads(config, self.vilbert.text_embeddings.word)
        self.dropout = nn.Dropout(config.fusion_dropout)
        self.answer = AnswerHead(c, num_answers)
        self.pair = nn.Linear(c, 1)
        self.region = nn.Linear(config.vision.hidden_size, 1)
        self.token = nn.Linear(config.text.hidden_size, 1)
        init_weights(self)

    def forward(
        self,
        input_ids: Tensor,
        features: Tensor,
        boxes: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        region_mask: Tensor | None = None,
        heads: tuple[str, ...] = TASK_HEADS,
    ) -> TaskOutput:
        unknown = set(heads) - set(TASK_HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; choose from {TASK_HEADS}")
        if region_mask is None:
            region_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        out = self.vilbert(input_ids, features, boxes, token_type_ids, attention_mask, region_mask)
        result = TaskOutput(trunk=out)
        if "answer" in heads or "pair" in heads:
            fused = self.dropout(fuse(out.pooled_text, out.pooled_vision, self.config.fusion))  # (B, C)
            if "answer" in heads:
                result.answer_logits = self.answer(fused)
            if "pair" in heads:
                result.pair_logit = self.pair(fused)
        if "alignment" in heads:
            result.alignment_logits = self.pretraining.alignment_logits(out)
        if "region" in heads:
            padding = (1.0 - region_mask.to(out.vision.dtype)) * MASK_OFFSET
            result.region_logits = self.region(self.dropout(out.vision)) + padding[..., None]
        if "region_class" in heads:
            result.region_class_logits = self.pretraining.region(out.vision)
        if "token_class" in heads:
            result.token_class_logits = self.pretraining.language(out.text)
        if "token" in heads:
            result.token_logits = self.token(self.dropout(out.text))
        return result


def init_weights(model: ViLBertForPretraining | ViLBertForTasks) -> None:
    """Reference initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms.

    Weight-normalised layers keep PyTorch's default direction with g = ||v|| (the reference's
    initialiser cannot reach them either)."""
    std = model.config.initializer_range
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and not hasattr(module, "parametrizations"):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    if model.config.pooler_init == "fan_in":
        pretraining = model.heads if isinstance(model, ViLBertForPretraining) else model.pretraining
        for layer in (model.vilbert.text_pooler.dense, model.vilbert.vision_pooler.dense, pretraining.alignment):
            layer.reset_parameters()


#: Either complete model.
ViLBertModule = ViLBertForPretraining | ViLBertForTasks
