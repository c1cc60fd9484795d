"""glibc malloc tuning for CPU training (``TrainerConfig.tune_malloc``), measured in benchmarks/training.py and
benchmarks/model_throughput.py: with default malloc every step page-faults freshly mapped memory."""

from __future__ import annotations

import ctypes

#: glibc malloc settings: ``tuned`` keeps freed memory in the process (no trimming, a fixed 32 MiB mmap threshold,
#: 256 MiB top pad) so that each step's activations and gradients reuse pages instead of page-faulting fresh ones.
MALLOC = {"default": {}, "tuned": {-1: 2**30, -3: 2**25, -2: 2**28}}  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_TOP_PAD


def tune_malloc(setting: str) -> None:
    """Apply a :data:`MALLOC` setting to this process (glibc only; irreversible)."""
    if MALLOC[setting]:
        libc = ctypes.CDLL("libc.so.6")
        for option, value in MALLOC[setting].items():
            if libc.mallopt(option, value) != 1:
                raise OSError(f"mallopt({option}, {value}) failed")
