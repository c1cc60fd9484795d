"""How pretraining reads and masks its captions (no torch here: the command line builds its options from it)."""

from __future__ import annotations

from dataclasses import dataclass

CAPTIONS_VALID = "captions.valid.parquet"
"""The captions table the validate step accepted."""

MASKED_PAIRS = ("all", "matched")
"""Choices of :attr:`PretrainingDataConfig.masked_pairs`."""


@dataclass(frozen=True)
class PretrainingDataConfig:
    """Which captions to use and how to mask them."""

    split: str = "train"
    """Captions of this split (the ``split`` column)."""
    max_text_length: int = 36
    """Tokens per caption including [CLS] and [SEP] (the original: 36)."""
    word_mask_prob: float = 0.15
    """Chance that a word piece is chosen for masked language modelling."""
    region_mask_prob: float = 0.15
    """Chance that a region (not region 0) is chosen for masked region modelling."""
    region_zero_prob: float = 0.9
    """Chance that a chosen region's feature is zeroed (else it is kept as it is)."""
    negative_prob: float = 0.5
    """Chance that an item's caption is replaced by another image's caption (alignment label 1)."""
    masked_pairs: str = "all"
    """Which pairs carry masked-modelling targets: ``all`` (the original: mismatched pairs too) or ``matched``
    (only the image's own captions, so every masked word is one its image can confirm: a masked colour in
    another image's caption teaches the model that the image does not tell).  Mismatched pairs are masked the
    same way either way, unsupervised: a pair without masks would give its alignment label away."""
    seed: int = 0
    """Seed of all masking and negative sampling (with the epoch and the item index)."""
    allow_uniform_class_probs: bool = False
    """Accept a store whose class distributions are a uniform placeholder as KL targets (learns nothing useful)."""
    skip_missing_images: bool = False
    """Drop captions whose image has no features (counted in ``report``) instead of raising."""

    def __post_init__(self) -> None:
        if self.max_text_length < 3:
            raise ValueError(f"max_text_length must be >= 3, got {self.max_text_length}")
        for name in ("word_mask_prob", "region_mask_prob", "region_zero_prob", "negative_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.masked_pairs not in MASKED_PAIRS:
            raise ValueError(f"masked_pairs must be one of {MASKED_PAIRS}, got {self.masked_pairs!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.split:
            raise ValueError("split must be given")
