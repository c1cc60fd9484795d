"""Turn torch tensors, numpy arrays and nested lists into numpy arrays, with clear errors."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_array(values: Any, *, name: str, dtype: Any = np.float64, ndim: int | None = None) -> np.ndarray:
    """``values`` (torch tensor on any device, numpy array or nested sequence) as a numpy array of ``dtype``.

    Floating-point results must be finite; ``ndim`` (when given) must match.  Raises ``ValueError`` naming
    ``name`` otherwise.  Torch is never imported here: tensors are recognised by their ``detach`` method.
    """
    if hasattr(values, "detach"):  # a torch tensor: leave autograd, go to CPU, widen bf16/fp16 numpy cannot hold
        tensor = values.detach().cpu()
        values = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot be read as a {np.dtype(dtype).name} array ({exc})") from exc
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def as_index_array(values: Any, *, name: str, upper: int) -> np.ndarray:
    """``values`` as a 1-d int64 array whose entries all lie in ``[0, upper)`` (``ValueError`` otherwise)."""
    raw = as_array(values, name=name, dtype=np.float64, ndim=1)
    if not np.all(raw == np.round(raw)):
        raise ValueError(f"{name}: expected integer indices")
    index = raw.astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= upper):
        raise ValueError(f"{name}: indices must lie in [0, {upper}), got range [{index.min()}, {index.max()}]")
    return index
