"""Feature-extraction backends, by name: ``detector`` (Faster R-CNN with user weights) and ``demo``; and
:func:`open_extractor`, the extractor that made a feature store (rebuilt from the store's ``extractor.json``).

The ``import`` path (existing TSV / LMDB / HDF5 features) is not an image backend: it lives in
:mod:`components.features.importers` and the features step calls it directly.
"""

from __future__ import annotations

import json

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

#: How to rebuild the extractor that made a store (backend, weights URI + sha256, settings, box limits), written
#: by the features step beside the store's own files.
EXTRACTOR_FILE = "extractor.json"

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


def open_extractor(store: str, device: str = "cpu") -> Extractor:
    """The extractor that made the features of ``store`` (same weights, checked by sha256; same box limits).

    For serving: features of a user's image, comparable with the ones the model was trained on.
    """
    from components import storage

    described = json.loads(storage.read_bytes(storage.join(store, EXTRACTOR_FILE)))
    prepared = PreparedBackend(**described["prepared"])
    return BACKENDS[prepared.backend].load(prepared, BoxLimits(**described["limits"]), device)


__all__ = [
    "BACKENDS",
    "EXTRACTOR_FILE",
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
    "open_extractor",
]
