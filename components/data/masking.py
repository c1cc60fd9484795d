"""The paper's masking for masked multimodal modelling (as the reference data loader does it).

Words: 15% of the real, non-special tokens are chosen; of those 80% become [MASK], 10% a random token,
10% stay unchanged; labels are the original ids there and -1 elsewhere.
Regions: 15% of the real regions other than region 0 (the whole-image token) are chosen (label 1, else
-1); the chosen regions' features are zeroed with probability 0.9.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -1


def mask_tokens(
    input_ids: Tensor,
    maskable: Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """Return (masked input ids, labels).  ``maskable`` (B, T) bool: real tokens that are not [CLS]/[SEP]."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_token_id
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[randomize] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomize]
    return masked, labels


def mask_regions(
    features: Tensor,
    region_mask: Tensor,
    generator: torch.Generator,
    probability: float = 0.15,
    zero_probability: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """Return (features with masked regions zeroed, labels (B, R): 1 = masked and supervised, else -1).

    Region 0 (whole image) and padding are never masked."""
    maskable = region_mask.bool().clone()
    maskable[:, 0] = False
    chosen = (torch.rand(region_mask.shape, generator=generator) < probability) & maskable
    zero = chosen & (torch.rand(region_mask.shape, generator=generator) < zero_probability)
    out = features.masked_fill(zero[..., None], 0.0)
    labels = torch.where(
        chosen, torch.ones_like(region_mask, dtype=torch.long), torch.full_like(region_mask, IGNORE, dtype=torch.long)
    )
    return out, labels
