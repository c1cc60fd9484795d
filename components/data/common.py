"""Pieces every dataset shares: errors, per-item randomness, text encoding, and store-coverage checks.

Randomness: every random choice an item makes (masking, negatives) draws from a generator seeded by
``(seed, epoch, index)`` alone, so an item is the same whichever worker builds it, in whichever order, and a
resumed run sees the very same batches.  Datasets take either an int index (the epoch set by ``set_epoch``) or
an ``(epoch, index)`` pair (what :class:`components.data.sampler.ResumableDistributedSampler` yields by
default; it survives ``persistent_workers``, where ``set_epoch`` on the main process's copy does
not reach the workers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from components.data.errors import DataError, EmptySplitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from components.data.regions import RegionSource
    from model.config import ViLBertConfig

IGNORE = -1  # label value of positions / items that are not supervised (the model's convention)
SHOW_IDS = 5  # how many offending ids an error message lists


class MissingFeaturesError(DataError):
    """Rows refer to images that the feature store does not hold."""


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends on ``(seed, epoch, index)`` only (SeedSequence mixes the three well)."""
    if seed < 0 or epoch < 0 or index < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    hi, lo = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(hi) << 32 | int(lo)) & (2**63 - 1))


def randint(generator: torch.Generator, high: int) -> int:
    """One integer in ``[0, high)`` from ``generator``."""
    return int(torch.randint(high, (1,), generator=generator))


class EpochItems:
    """Mixin: ``set_epoch`` and the ``int | (epoch, index)`` item keys described in the module docstring."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Items drawn from now on (with int keys) use this epoch's randomness."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _key(self, key: int | tuple[int, int], size: int) -> tuple[int, int]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        if not 0 <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} items")
        return epoch, index


@dataclass
class DatasetReport:
    """How the rows of a dataset's source were used; ``rows == items_rows + every dropped count``."""

    rows: int = 0
    """Rows read from the source for the requested split."""
    kept: int = 0
    """Rows that became items (an item may expand to several, e.g. one per sentence)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> rows dropped (``rejected``: quarantined by validation; ``missing_features``: image not in the
    store, with ``skip_missing_images``; task-specific reasons)."""

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    @property
    def reconciled(self) -> bool:
        return self.rows == self.kept + sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: ViLBertConfig) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, or that lacks a special token the data needs."""
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise DataError(f"the tokenizer has no {name.removesuffix('_id')} (a BERT WordPiece tokenizer is needed)")
    if len(tokenizer) > config.text.vocab_size:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's text.vocab_size is {config.text.vocab_size}"
        )


def encode_text(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, pair: str | None = None
) -> dict[str, Tensor]:
    """``[CLS] text [SEP]`` (or ``[CLS] text [SEP] pair [SEP]`` with segment ids 0 / 1), truncated to
    ``max_length`` tokens (pairs: longest first, as the reference's ``_truncate_seq_pair``).

    Returns ``input_ids``, ``token_type_ids``, ``attention_mask`` (T,) long and ``special_tokens_mask`` (T,) bool.
    """
    if max_length < (3 if pair is not None else 2):
        raise ValueError(f"max_length {max_length} leaves no room for the text")
    enc = tokenizer(
        text,
        pair,
        truncation=True,
        max_length=max_length,
        return_token_type_ids=True,
        return_attention_mask=True,
        return_special_tokens_mask=True,
    )
    return {
        "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
        "token_type_ids": torch.tensor(enc["token_type_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
        "special_tokens_mask": torch.tensor(enc["special_tokens_mask"], dtype=torch.bool),
    }


def require_features(
    image_ids: Sequence[str], regions: RegionSource, skip_missing: bool, what: str
) -> tuple[list[bool], int]:
    """Which rows' images the store holds: ``(keep per row, rows missing)``.

    Raises :class:`MissingFeaturesError` naming a few missing images unless ``skip_missing``."""
    keep = [image_id in regions for image_id in image_ids]
    missing = [image_id for image_id, ok in zip(image_ids, keep, strict=True) if not ok]
    if missing and not skip_missing:
        unique = list(dict.fromkeys(missing))
        raise MissingFeaturesError(
            f"{len(missing)} {what} rows refer to {len(unique)} images without features in the store "
            f"{regions.root}, e.g. {unique[:SHOW_IDS]}; extract their features, or pass skip_missing_images=True "
            "to drop those rows"
        )
    return keep, len(missing)


def non_empty(count: int, what: str, split: str, report: DatasetReport) -> None:
    """Raise :class:`EmptySplitError` when a dataset ends up with no items."""
    if count == 0:
        detail = f" ({report.rows} rows read, dropped: {report.dropped})" if report.rows else ""
        raise EmptySplitError(f"{what}: split {split!r} has no usable rows{detail}")
