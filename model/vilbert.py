"""The ViLBERT trunk: two embedded streams, the two-stream encoder and one pooler per stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ViLBertConfig
from .embeddings import TextEmbeddings, VisionEmbeddings
from .layers import EncoderOutput, StreamMask, TwoStreamEncoder


class InputError(ValueError):
    """A model input has the wrong shape, dtype or values."""


@dataclass
class ViLBertInputs:
    """One batch for the trunk.  Masks use 1 = real, 0 = padding."""

    input_ids: Tensor
    """(B, T) int64 WordPiece ids; [CLS] first."""
    features: Tensor
    """(B, R, D) float region features; region 0 is the whole-image token."""
    boxes: Tensor
    """(B, R, 5) float [x1, y1, x2, y2, area], normalised to [0, 1]."""
    token_type_ids: Tensor | None = None
    """(B, T) segment ids, default zeros."""
    attention_mask: Tensor | None = None
    """(B, T) text padding mask, default ones."""
    region_mask: Tensor | None = None
    """(B, R) region padding mask, default ones."""


@dataclass
class ViLBertOutput:
    """Trunk outputs."""

    text: Tensor
    """(B, T, Ht) final text states."""
    vision: Tensor
    """(B, R, Hv) final region states."""
    pooled_text: Tensor
    """(B, C) activation(dense(summary)): the [CLS] state, or the mean over real tokens (``text_pooling``)."""
    pooled_vision: Tensor
    """(B, C) activation(dense(vision[:, 0])), the whole-image token summary (ReLU unless ``pooler_activation``)."""
    text_embeddings: Tensor
    """(B, T, Ht) embedding layer output."""
    vision_embeddings: Tensor
    """(B, R, Hv) embedding layer output."""
    encoder: EncoderOutput
    """Per-block states and attention maps, when requested."""


class Pooler(nn.Module):
    """First token (or the mean over real positions) -> dense -> ReLU or tanh.

    The reference pools the first token through ReLU, not BERT's tanh; ``mean`` and ``tanh`` are the
    :class:`ViLBertConfig` options ``text_pooling`` / ``pooler_activation``."""

    def __init__(self, hidden: int, out: int, pooling: str = "cls", activation: str = "relu"):
        super().__init__()
        self.dense = nn.Linear(hidden, out)
        self.pooling = pooling
        self.activation = torch.tanh if activation == "tanh" else torch.relu

    def forward(self, states: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.pooling == "cls":
            summary = states[:, 0]
        elif mask is None:
            summary = states.mean(1)
        else:
            real = mask.to(states.dtype).unsqueeze(-1)
            summary = (states * real).sum(1) / real.sum(1).clamp(min=1.0)
        return self.activation(self.dense(summary))


def fuse(pooled_text: Tensor, pooled_vision: Tensor, method: str) -> Tensor:
    """Combine the two pooled vectors (B, C): element-wise product (``mul``) or sum (``sum``)."""
    return pooled_text * pooled_vision if method == "mul" else pooled_text + pooled_vision


class ViLBertModel(nn.Module):
    """Two-stream BERT over words and image regions, connected only by co-attention blocks."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.config = config
        self.text_embeddings = TextEmbeddings(config.text, config.layer_norm_eps)
        self.vision_embeddings = VisionEmbeddings(config.vision, config.layer_norm_eps, config.text.dropout)
        self.encoder = TwoStreamEncoder(config)
        act = config.pooler_activation
        self.text_pooler = Pooler(config.text.hidden_size, config.coattention.hidden_size, config.text_pooling, act)
        self.vision_pooler = Pooler(config.vision.hidden_size, config.coattention.hidden_size, "cls", act)
        self.check_inputs = True
        """Validate every batch (shapes, ranges, finiteness); turn off in tight loops after the first batches."""
        self.skip_padding = "train"
        """When per-position layers skip padded tokens and regions: "train" (training mode only), "always" or
        "never".  Real positions get the same values either way; skipped (padded) positions come out as zeros
        instead of the values the original computes there and never uses."""

    def forward(
        self,
        input_ids: Tensor,
        features: Tensor,
        boxes: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        region_mask: Tensor | None = None,
        output_block_states: bool = False,
        output_attentions: bool = False,
    ) -> ViLBertOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if region_mask is None:
            region_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        if self.check_inputs:
            validate_inputs(self.config, input_ids, features, boxes, token_type_ids, attention_mask, region_mask)
        dtype = self.text_embeddings.word.weight.dtype
        text = self.text_embeddings(input_ids, token_type_ids)  # (B, T, Ht)
        vision = self.vision_embeddings(features.to(dtype), boxes.to(dtype))  # (B, R, Hv)
        if self.skip_padding not in ("train", "always", "never"):
            raise ValueError(f"skip_padding must be 'train', 'always' or 'never', got {self.skip_padding!r}")
        skip = self.skip_padding == "always" or (self.skip_padding == "train" and self.training)
        enc = self.encoder(
            text,
            StreamMask.build(attention_mask, text.dtype, skip),
            vision,
            StreamMask.build(region_mask, vision.dtype, skip),
            output_block_states,
            output_attentions,
        )
        return ViLBertOutput(
            enc.text,
            enc.vision,
            self.text_pooler(enc.text, attention_mask),
            self.vision_pooler(enc.vision),
            text,
            vision,
            enc,
        )


def validate_inputs(
    config: ViLBertConfig,
    input_ids: Tensor,
    features: Tensor,
    boxes: Tensor,
    token_type_ids: Tensor,
    attention_mask: Tensor,
    region_mask: Tensor,
) -> None:
    """Raise :class:`InputError` naming the first problem found in a batch."""
    t, v = config.text, config.vision
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    b, n_tok = input_ids.shape
    if n_tok > t.max_position_embeddings:
        raise InputError(f"text length {n_tok} exceeds max_position_embeddings {t.max_position_embeddings}")
    if features.ndim != 3:
        raise InputError(f"features must be (batch, regions, feature_size), got shape {tuple(features.shape)}")
    if features.shape[-1] != v.feature_size:
        raise InputError(
            f"feature dimension {features.shape[-1]} does not match the model's vision.feature_size {v.feature_size}"
        )
    if features.shape[0] != b:
        raise InputError(f"batch size mismatch: input_ids has {b} rows, features has {features.shape[0]}")
    n_reg = features.shape[1]
    if n_reg < 1:
        raise InputError("features must hold at least one region (region 0, the whole-image token)")
    if tuple(boxes.shape) != (b, n_reg, v.location_size):
        raise InputError(
            f"boxes must have shape {(b, n_reg, v.location_size)} to match features, got {tuple(boxes.shape)}"
        )
    for name, mask, shape in (
        ("token_type_ids", token_type_ids, (b, n_tok)),
        ("attention_mask", attention_mask, (b, n_tok)),
        ("region_mask", region_mask, (b, n_reg)),
    ):
        if tuple(mask.shape) != shape:
            raise InputError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    if bool((input_ids < 0).any()) or bool((input_ids >= t.vocab_size).any()):
        bad = input_ids[(input_ids < 0) | (input_ids >= t.vocab_size)]
        raise InputError(f"token ids outside the vocabulary [0, {t.vocab_size}): {bad[:5].tolist()}")
    if bool((token_type_ids < 0).any()) or bool((token_type_ids >= t.type_vocab_size).any()):
        raise InputError(f"token_type_ids must lie in [0, {t.type_vocab_size})")
    if not bool(torch.isfinite(features).all()):
        raise InputError("features contain NaN or infinite values")
    if not bool(torch.isfinite(boxes).all()):
        raise InputError("boxes contain NaN or infinite values")
    real = region_mask.bool()
    if bool(((boxes < 0) | (boxes > 1)).any(-1)[real].any()):
        raise InputError("boxes must be normalised to [0, 1] ([x1/W, y1/H, x2/W, y2/H, area fraction])")
    if not bool(attention_mask[:, 0].bool().all()) or not bool(region_mask[:, 0].bool().all()):
        raise InputError("the first token ([CLS]) and region 0 (whole image) must not be padding")
