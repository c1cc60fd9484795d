"""Transformer building blocks of ViLBERT: the single-stream layer (TRM), the co-attention block (Co-TRM)
and the two-stream encoder that interleaves them.

Shapes: B batch, T text tokens, R regions, Ht / Hv stream widths, C co-attention width, nh heads.
All layers are post-LayerNorm (BERT style); attention goes through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CoAttentionConfig, ViLBertConfig

#: Additive score offset for padded keys, as in the reference (not -inf, so a fully padded row stays finite).
MASK_OFFSET = -10000.0


def activation(name: str):
    """The feed-forward non-linearity named in a config (exact erf GELU, as the reference)."""
    return {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}[name]


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1 = keep / 0 = padding  ->  (B, 1, 1, L) additive attention bias in ``dtype``."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_OFFSET


@dataclass
class StreamMask:
    """The padding of one stream: its additive attention bias and, when padded positions are skipped,
    where the real positions are.

    Skipping padding ("unpadding") runs every per-position layer (projections, feed-forwards, LayerNorms)
    on the N real positions only, as a packed (N, F) tensor, and pads only for attention.  Real positions
    get exactly the same values (padded keys have zero attention weight either way); padded positions are
    simply not computed.  With ``index`` None the stream stays padded (B, L, F) everywhere.
    """

    bias: Tensor
    """(B, 1, 1, L) additive attention bias (0 = real, -10000 = padding)."""
    shape: tuple[int, int]
    """(B, L) of the padded layout."""
    index: Tensor | None = None
    """(N,) flat indices of the real positions in B*L, or None when nothing is skipped."""

    @classmethod
    def build(cls, mask: Tensor, dtype: torch.dtype, skip_padding: bool) -> StreamMask:
        index = None
        if skip_padding and not bool(mask.bool().all()):
            index = mask.reshape(-1).nonzero().squeeze(1)
        return cls(additive_mask(mask, dtype), (mask.shape[0], mask.shape[1]), index)

    def to_padded(self, x: Tensor) -> Tensor:
        """(N, F) packed -> (B, L, F), zeros at padded positions (identity when not packed)."""
        if self.index is None:
            return x
        b, length = self.shape
        out = x.new_zeros(b * length, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(b, length, x.shape[-1])

    def to_packed(self, x: Tensor) -> Tensor:
        """(B, L, F) -> (N, F) real positions only (identity when not packed)."""
        if self.index is None:
            return x
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)


def attend(
    query: Tensor, key: Tensor, value: Tensor, bias: Tensor, num_heads: int, dropout: float, return_probs: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention of ``query`` (B, Lq, C) over ``key``/``value`` (B, Lk, C).

    ``bias`` is the (B, 1, 1, Lk) additive mask.  Returns the context (B, Lq, C) and, when asked, the
    attention probabilities (B, nh, Lq, Lk) computed explicitly (for visualisation; slower).
    """
    b, lq, c = query.shape
    lk = key.shape[1]
    hs = c // num_heads
    q = query.view(b, lq, num_heads, hs).transpose(1, 2)  # (B, nh, Lq, hs)
    k = key.view(b, lk, num_heads, hs).transpose(1, 2)  # (B, nh, Lk, hs)
    v = value.view(b, lk, num_heads, hs).transpose(1, 2)  # (B, nh, Lk, hs)
    probs = None
    if return_probs:
        scores = q @ k.transpose(-1, -2) / hs**0.5 + bias
        probs = scores.softmax(dim=-1)
        ctx = F.dropout(probs, dropout) @ v
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return ctx.transpose(1, 2).reshape(b, lq, c), probs  # (B, Lq, C)


class AddNorm(nn.Module):
    """Project a branch, add it to the residual and normalise: ``norm(residual + dropout(dense(x)))``."""

    def __init__(self, in_size: int, out_size: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_size, out_size)
        self.norm = nn.LayerNorm(out_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.norm(residual + self.dropout(self.dense(x)))


class FeedForward(nn.Module):
    """Position-wise feed-forward with its residual: ``norm(x + down(act(up(x))))``."""

    def __init__(self, hidden: int, intermediate: int, act: str, dropout: float, eps: float):
        super().__init__()
        self.up = nn.Linear(hidden, intermediate)
        self.act = activation(act)
        self.down = AddNorm(intermediate, hidden, dropout, eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)), x)


class TransformerLayer(nn.Module):
    """One self-attention layer (TRM) of either stream."""

    def __init__(
        self, hidden: int, heads: int, intermediate: int, act: str, dropout: float, attention_dropout: float, eps: float
    ):
        super().__init__()
        self.num_heads = heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)  # query, key and value in one matmul
        self.attention_out = AddNorm(hidden, hidden, dropout, eps)
        self.ffn = FeedForward(hidden, intermediate, act, dropout, eps)

    def forward(self, x: Tensor, mask: StreamMask, return_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x`` (B, L, H), or (N, H) packed when ``mask`` skips padding."""
        q, k, v = mask.to_padded(self.qkv(x)).chunk(3, dim=-1)  # 3 x (B, L, H)
        p = self.attention_dropout if self.training else 0.0
        ctx, probs = attend(q, k, v, mask.bias, self.num_heads, p, return_probs)
        return self.ffn(self.attention_out(mask.to_packed(ctx), x)), probs


class CoAttentionLayer(nn.Module):
    """Co-attention block (Co-TRM): each stream's queries attend over the other stream's keys and values,
    then each stream runs its own feed-forward."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        t, v, co, eps = config.text, config.vision, config.coattention, config.layer_norm_eps
        c = co.hidden_size
        self.num_heads = co.num_heads
        self.text_attention_dropout = v.attention_dropout  # text queries over visual keys
        self.vision_attention_dropout = t.attention_dropout  # visual queries over text keys
        self.text_query = nn.Linear(t.hidden_size, c)
        self.vision_key_value = nn.Linear(v.hidden_size, 2 * c)
        self.vision_query = nn.Linear(v.hidden_size, c)
        self.text_key_value = nn.Linear(t.hidden_size, 2 * c)
        self.text_attention_out = AddNorm(c, t.hidden_size, t.dropout, eps)
        self.vision_attention_out = AddNorm(c, v.hidden_size, v.dropout, eps)
        self.text_ffn = FeedForward(t.hidden_size, t.intermediate_size, t.hidden_act, t.dropout, eps)
        self.vision_ffn = FeedForward(v.hidden_size, v.intermediate_size, v.hidden_act, v.dropout, eps)

    def forward(
        self, text: Tensor, text_mask: StreamMask, vision: Tensor, vision_mask: StreamMask, return_probs: bool = False
    ) -> tuple[Tensor, Tensor, tuple[Tensor | None, Tensor | None]]:
        """``text`` (B, T, Ht) and ``vision`` (B, R, Hv), or packed (N, H) where their masks skip padding."""
        vk, vv = vision_mask.to_padded(self.vision_key_value(vision)).chunk(2, dim=-1)  # 2 x (B, R, C)
        tk, tv = text_mask.to_padded(self.text_key_value(text)).chunk(2, dim=-1)  # 2 x (B, T, C)
        tq = text_mask.to_padded(self.text_query(text))  # (B, T, C)
        vq = vision_mask.to_padded(self.vision_query(vision))  # (B, R, C)
        pt = self.text_attention_dropout if self.training else 0.0
        pv = self.vision_attention_dropout if self.training else 0.0
        # Text queries see the regions (image padding mask); visual queries see the words (text mask).
        text_ctx, t2v = attend(tq, vk, vv, vision_mask.bias, self.num_heads, pt, return_probs)
        vision_ctx, v2t = attend(vq, tk, tv, text_mask.bias, self.num_heads, pv, return_probs)
        text = self.text_ffn(self.text_attention_out(text_mask.to_packed(text_ctx), text))  # (B, T, Ht)
        vision = self.vision_ffn(self.vision_attention_out(vision_mask.to_packed(vision_ctx), vision))  # (B, R, Hv)
        return text, vision, (t2v, v2t)


@dataclass
class EncoderOutput:
    """Final hidden states of both streams, and optionally what happened on the way."""

    text: Tensor
    """(B, T, Ht) text stream output."""
    vision: Tensor
    """(B, R, Hv) visual stream output."""
    block_states: list[tuple[Tensor, Tensor]] | None = None
    """Per co-attention block: its (text, vision) outputs."""
    coattention_probs: list[tuple[Tensor, Tensor]] | None = None
    """Per co-attention block: (text->vision (B, nh, T, R), vision->text (B, nh, R, T)) attention."""


class TwoStreamEncoder(nn.Module):
    """Runs the text and visual TRM stacks, interleaved with the co-attention blocks per the config."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        t, v, eps = config.text, config.vision, config.layer_norm_eps
        self.config = config
        self.text_layers = nn.ModuleList(
            TransformerLayer(
                t.hidden_size, t.num_heads, t.intermediate_size, t.hidden_act, t.dropout, t.attention_dropout, eps
            )
            for _ in range(t.num_layers)
        )
        self.vision_layers = nn.ModuleList(
            TransformerLayer(
                v.hidden_size, v.num_heads, v.intermediate_size, v.hidden_act, v.dropout, v.attention_dropout, eps
            )
            for _ in range(v.num_layers)
        )
        self.coattention_layers = nn.ModuleList(CoAttentionLayer(config) for _ in range(config.coattention.num_blocks))

    @staticmethod
    def _run(layers: nn.ModuleList, start: int, stop: int, frozen: int, x: Tensor, mask: StreamMask) -> Tensor:
        for i in range(start, stop):
            with torch.no_grad() if i < frozen else contextlib.nullcontext():
                x, _ = layers[i](x, mask)
        return x

    def forward(
        self,
        text: Tensor,
        text_mask: StreamMask,
        vision: Tensor,
        vision_mask: StreamMask,
        output_block_states: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """Streams come in and go out padded (B, L, H); inside, they are packed where the masks say so."""
        text, vision = text_mask.to_packed(text), vision_mask.to_packed(vision)
        co: CoAttentionConfig = self.config.coattention
        t_frozen, v_frozen = self.config.text.frozen_layers, self.config.vision.frozen_layers
        blocks: list[tuple[Tensor, Tensor]] = []
        probs: list[tuple[Tensor, Tensor]] = []
        t_at = v_at = 0
        for block, t_stop, v_stop in zip(
            self.coattention_layers, co.text_layers_before, co.vision_layers_before, strict=True
        ):
            vision = self._run(self.vision_layers, v_at, v_stop, v_frozen, vision, vision_mask)
            text = self._run(self.text_layers, t_at, t_stop, t_frozen, text, text_mask)
            if co.enabled:
                text, vision, block_probs = block(text, text_mask, vision, vision_mask, output_attentions)
                probs.append(block_probs)
            if output_block_states:
                blocks.append((text_mask.to_padded(text), vision_mask.to_padded(vision)))
            t_at, v_at = t_stop, v_stop
        vision = self._run(self.vision_layers, v_at, len(self.vision_layers), v_frozen, vision, vision_mask)
        text = self._run(self.text_layers, t_at, len(self.text_layers), t_frozen, text, text_mask)
        return EncoderOutput(
            text_mask.to_padded(text),
            vision_mask.to_padded(vision),
            blocks if output_block_states else None,
            probs if output_attentions else None,
        )
