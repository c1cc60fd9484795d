"""Input embeddings of both streams, and the helpers that build the visual inputs from detector boxes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TextConfig, VisionConfig


class TextEmbeddings(nn.Module):
    """BERT embeddings: ``LayerNorm(word + position + segment)``, then dropout."""

    def __init__(self, config: TextConfig, eps: float):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        # Positions are 0..T-1 for every row; padding sits at the end and does not shift them.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))  # (B, T, Ht)


class VisionEmbeddings(nn.Module):
    """Region embeddings: ``LayerNorm(W_f feature + W_l location)``, then dropout.

    Regions carry no position or segment embedding: their order does not matter, their box does.
    """

    def __init__(self, config: VisionConfig, eps: float, dropout: float):
        super().__init__()
        self.feature = nn.Linear(config.feature_size, config.hidden_size)
        self.location = nn.Linear(config.location_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)  # the reference uses the TEXT dropout probability here

    def forward(self, features: Tensor, boxes: Tensor) -> Tensor:
        return self.dropout(self.norm(self.feature(features) + self.location(boxes)))  # (B, R, Hv)


def normalized_boxes(boxes_xyxy: Tensor, width: float, height: float) -> Tensor:
    """Pixel boxes (N, 4) as [x1, y1, x2, y2]  ->  (N, 5) [x1/W, y1/H, x2/W, y2/H, area / (W*H)]."""
    if boxes_xyxy.ndim != 2 or boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) [x1, y1, x2, y2], got {tuple(boxes_xyxy.shape)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    b = boxes_xyxy.to(torch.float32)
    scale = b.new_tensor([width, height, width, height])
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (width * height)
    return torch.cat([b / scale, area[:, None]], dim=1)


def with_image_token(features: Tensor, boxes: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Prepend region 0, the whole-image token: mean of the real region features, box [0, 0, 1, 1, 1].

    ``features`` (B, N, D), ``boxes`` (B, N, 5), ``mask`` (B, N) 1 = real region.  Returns the three
    tensors with N + 1 regions.
    """
    if mask is None:
        mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
    weights = mask.to(features.dtype)[..., None]  # (B, N, 1)
    mean = (features * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)
    whole = boxes.new_tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(boxes.shape[0], 1, 5)
    ones = mask.new_ones(mask.shape[0], 1)
    return torch.cat([mean, features], 1), torch.cat([whole, boxes], 1), torch.cat([ones, mask], 1)
