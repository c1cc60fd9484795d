"""Batching: pads text and regions per batch and returns the model's keyword arguments.

An item (what every dataset here returns) is a dict of unpadded tensors named like the model's forward
arguments, plus two reserved keys:

* ``"labels"``: task targets that are not forward arguments (VQA ``answer_scores`` (A,), multiple-choice
  ``choice`` (), grounding ``grounding_targets`` (N,));
* ``"meta"``: bookkeeping (ids, evaluation data); ``meta["num_choices"] = K`` marks a multiple-choice item whose
  text and region tensors carry a leading choice dimension: text (K, T), regions (K, N, ...).

The batch is the same: forward arguments at the top level, padded to the batch maximum (or to fixed lengths)
and stacked to (B, ...), with multiple-choice items flattened to B*K rows (choice-major within an item: row
``b * K + k`` is choice k of item b), ``"labels"`` stacked to (B, ...), and ``"meta"`` holding lists (tensors
of equal shape are stacked; region-aligned ones padded).  Use :func:`model_inputs` to call the model::

    out = model(**model_inputs(batch), heads=("pair",))
    logits = out.pair_logit.view(-1, batch["meta"]["num_choices"])      # (B, K)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from components.data.common import IGNORE, DataError

#: Keys of ``ViLBertForPretraining.forward`` / ``ViLBertForTasks.forward`` that a batch may carry.
MODEL_KEYS = (
    "input_ids",
    "features",
    "boxes",
    "token_type_ids",
    "attention_mask",
    "region_mask",
    "masked_lm_labels",
    "region_labels",
    "region_targets",
    "alignment_labels",
)
LABELS, META = "labels", "meta"

#: Text-aligned keys (token axis last) and their padding values; ``None`` = the tokenizer's pad id.
TEXT_PAD: dict[str, int | None] = {
    "input_ids": None,
    "token_type_ids": 0,
    "attention_mask": 0,
    "masked_lm_labels": IGNORE,
}
#: Region-aligned keys (region axis first, after any choice axis) and their padding values.
REGION_PAD: dict[str, float] = {
    "features": 0.0,
    "boxes": 0.0,
    "region_mask": 0,
    "region_labels": IGNORE,
    "region_targets": 0.0,
    "grounding_targets": 0.0,
    "region_iou": 0.0,
    "pixel_boxes": 0.0,
}


def _pad(t: Tensor, axis: int, length: int, value: float) -> Tensor:
    missing = length - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t, t.new_full(shape, value)], dim=axis)


class Collator:
    """``collate(items) -> batch`` for a DataLoader (``collate_fn=Collator(...)``); picklable.

    ``text_length`` / ``num_regions``: pad every batch to exactly this many tokens / regions (the original
    pads to 36 tokens and 37 regions); ``None`` pads to the batch's longest (less compute).  An item longer than
    a fixed length is an error (datasets truncate when they build items; the collator never cuts).
    """

    def __init__(self, pad_token_id: int = 0, text_length: int | None = None, num_regions: int | None = None):
        for name, value in (("text_length", text_length), ("num_regions", num_regions)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None, got {value}")
        self.pad_token_id = pad_token_id
        self.text_length = text_length
        self.num_regions = num_regions

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise DataError("cannot collate an empty list of items")
        choices = {item.get(META, {}).get("num_choices") for item in items}
        if len(choices) != 1:
            raise DataError(f"items with different numbers of choices in one batch: {sorted(map(str, choices))}")
        k = choices.pop()
        lead = 0 if k is None else 1  # axis of the tokens' / regions' dimension inside an item
        text_len = self._length([item["input_ids"].shape[-1] for item in items], self.text_length, "text")
        region_len = self._length([item["features"].shape[lead] for item in items], self.num_regions, "region")
        batch: dict[str, Any] = {}
        for key in items[0]:
            if key in (LABELS, META):
                continue
            tensors = [item[key] for item in items]
            if key in TEXT_PAD:
                pad = TEXT_PAD[key]
                value = self.pad_token_id if pad is None else pad
                tensors = [_pad(t, t.ndim - 1, text_len, value) for t in tensors]
            elif key in REGION_PAD:
                tensors = [_pad(t, lead, region_len, REGION_PAD[key]) for t in tensors]
            batch[key] = torch.stack(tensors) if k is None or tensors[0].ndim == 0 else torch.cat(tensors)
        batch[LABELS] = self._group([item.get(LABELS, {}) for item in items], region_len)
        batch[META] = self._group([item.get(META, {}) for item in items], region_len)
        if k is not None:
            batch[META]["num_choices"] = k
        return batch

    @staticmethod
    def _length(lengths: list[int], fixed: int | None, what: str) -> int:
        longest = max(lengths)
        if fixed is None:
            return longest
        if longest > fixed:
            raise DataError(f"an item has {longest} {what} positions, more than the fixed length {fixed}")
        return fixed

    @staticmethod
    def _group(dicts: list[dict[str, Any]], region_len: int) -> dict[str, Any]:
        """Stack tensors that line up (padding region-aligned ones); everything else becomes a list."""
        out: dict[str, Any] = {}
        keys = dict.fromkeys(key for d in dicts for key in d)
        for key in keys:
            values = [d.get(key) for d in dicts]
            tensors = [v for v in values if isinstance(v, Tensor)]
            if len(tensors) == len(values):
                if key in REGION_PAD:
                    tensors = [_pad(v, 0, region_len, REGION_PAD[key]) for v in tensors]
                if len({tuple(v.shape) for v in tensors}) == 1:
                    out[key] = torch.stack(tensors)
                    continue
            out[key] = values
        return out


def model_inputs(batch: dict[str, Any]) -> dict[str, Tensor]:
    """The batch's forward arguments only (without ``labels`` and ``meta``)."""
    return {key: value for key, value in batch.items() if key in MODEL_KEYS}


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move every tensor of a batch (nested dicts included) to ``device``; lists stay as they are."""
    if isinstance(batch, dict):
        return {key: to_device(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    return batch
