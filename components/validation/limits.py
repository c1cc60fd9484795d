"""The thresholds the validation suites check against (a sub-config of ``ValidateConfig``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidationLimits:
    """What counts as a good row, and how many bad rows a table may have before the step fails."""

    min_text_chars: int = 1
    """Shortest caption / question / referring expression, in characters after stripping whitespace."""
    max_text_chars: int = 1000
    """Longest caption / question / referring expression, in characters."""
    min_image_side: int = 8
    """Smallest accepted image width and height, in pixels."""
    max_image_side: int = 10_000
    """Largest accepted image width and height, in pixels."""
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
    """PIL format names an image may have."""
    min_regions: int = 10
    """Fewest detected regions per image (the paper keeps 10 to 36 boxes)."""
    max_regions: int = 36
    """Most detected regions per image."""
    class_sum_tolerance: float = 1e-2
    """Allowed |sum - 1| of a region's class distribution (stored in fp16, so not exactly 1)."""
    box_tolerance_px: float = 1.0
    """How far (pixels) a box may stick out of its image before it counts as outside."""
    max_bad_fraction: float = 0.05
    """A table with more than this fraction of quarantined rows fails the step."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_text_chars <= self.max_text_chars:
            raise ValueError(
                f"need 0 <= min_text_chars <= max_text_chars, got {self.min_text_chars}, {self.max_text_chars}"
            )
        if not 1 <= self.min_image_side <= self.max_image_side:
            raise ValueError(
                f"need 1 <= min_image_side <= max_image_side, got {self.min_image_side}, {self.max_image_side}"
            )
        if not self.image_formats:
            raise ValueError("image_formats must name at least one format")
        if not 1 <= self.min_regions <= self.max_regions:
            raise ValueError(f"need 1 <= min_regions <= max_regions, got {self.min_regions}, {self.max_regions}")
        if not 0 < self.class_sum_tolerance < 1:
            raise ValueError(f"class_sum_tolerance must be in (0, 1), got {self.class_sum_tolerance}")
        if self.box_tolerance_px < 0:
            raise ValueError(f"box_tolerance_px must be >= 0, got {self.box_tolerance_px}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
