"""Datasets, masking and collation for pretraining and fine-tuning."""

DEFAULT_MAX_REGIONS = 37
"""Regions per image, the whole-image token included (the paper: 36 detected regions + region 0)."""
