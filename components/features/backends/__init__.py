"""Feature-extraction backends, by name: ``detector`` (Faster R-CNN with user weights) and ``demo``.

The ``import`` path (existing TSV / LMDB / HDF5 features) is not an image backend: it lives in
:mod:`components.features.importers` and the features step calls it directly.
"""

from __future__ import annotations

from components.features.backends.base import (
    Backend,
    BackendError,
    BoxLimits,
    Extractor,
    ImageRegions,
    PrepareContext,
    PreparedBackend,
    decode_rgb,
)
from components.features.backends.demo import DemoBackend, DemoOptions
from components.features.backends.detector import DetectorBackend, DetectorOptions

#: Registry: backend name -> class.  A class is built from its options and has ``prepare`` and ``load``.
BACKENDS: dict[str, type[DetectorBackend] | type[DemoBackend]] = {
    DetectorBackend.name: DetectorBackend,
    DemoBackend.name: DemoBackend,
}


def backend_class(name: str) -> type[DetectorBackend] | type[DemoBackend]:
    """The backend class registered as ``name``; a clear error for unknown names."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown feature backend {name!r}; choose one of {sorted(BACKENDS)}") from None


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BoxLimits",
    "DemoBackend",
    "DemoOptions",
    "DetectorBackend",
    "DetectorOptions",
    "Extractor",
    "ImageRegions",
    "PrepareContext",
    "PreparedBackend",
    "backend_class",
    "decode_rgb",
]
