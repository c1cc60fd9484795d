"""The data layer's errors (no torch here: the command lines import them)."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot feed the model; the message says what is wrong and where."""


class EmptySplitError(DataError):
    """A split has no usable rows (none in the files, or none left after dropping rejected ones)."""
