"""The trainer's typed configuration and its result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class TrainerConfigError(ValueError):
    """A trainer setting is missing, inconsistent or out of range."""


@dataclass(frozen=True)
class TrainerConfig:
    """How to train.  Lengths are in optimizer steps; a step is ``grad_accum`` micro-batches per rank."""

    output_dir: Path
    """Folder for ``checkpoints/`` and ``final/`` (rank 0 writes; every rank reads on resume)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (with ``epochs`` too: whichever comes first)."""
    epochs: float | None = None
    """Stop after this many passes over the data (fractions allowed)."""
    batch_size: int = 8
    """Examples per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    drop_last: bool = True
    """Drop each epoch's last incomplete micro-batch (keeps every step the same size)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    """``(name prefix, factor)`` pairs: a parameter whose name starts with a prefix trains at ``lr * factor`` (the
    first matching pair counts; the rest train at ``lr``).  Fine-tuning gives its fresh task heads a larger rate."""
    freeze: tuple[str, ...] = ()
    """Name prefixes of parameters that are not trained (no gradient, no optimizer state).  The demo freezes the
    tied word embeddings: their dense 30522 x 384 gradient was a fifth of a CPU training step."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay for matrices (biases and LayerNorms never decay)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW beta1, beta2."""
    adam_eps: float = 1e-6
    """AdamW epsilon (BERT / ViLBERT use 1e-6)."""
    warmup_steps: int | None = None
    """Linear warm-up length in steps; None uses ``warmup_fraction``."""
    warmup_fraction: float = 0.1
    """Warm-up length as a fraction of the total steps (when ``warmup_steps`` is None)."""
    clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None or 0 disables clipping."""
    seed: int = 0
    """Seed of python / numpy / torch; rank r uses seed + r."""
    checkpoint_every: int = 500
    """Write a checkpoint every N steps (and always after the last step)."""
    keep_last: int = 3
    """Checkpoints to keep; older ones are deleted after a new one is written."""
    log_every: int = 10
    """Log training metrics every N steps (and after the last)."""
    eval_every: int | None = None
    """Call ``eval_fn`` every N steps; it is always called after the last step (None: only then)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (exact resume then needs sample-derived randomness in collate)."""
    device: str = "auto"
    """``auto`` (cuda:<local_rank> if CUDA is available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    bf16: bool = True
    """bf16 autocast on CUDA devices that support it; never applied on CPU."""
    fused_adamw: bool | None = None
    """Use the fused AdamW kernel; None: where the device supports it."""
    find_unused_parameters: bool | None = None
    """DDP's find_unused_parameters; None: probe one batch and turn it on only if some parameter gets no gradient."""
    resume: bool = True
    """Resume from the newest valid checkpoint in ``output_dir/checkpoints`` (off: refuse to start over them)."""
    force_resume: bool = False
    """Resume even when the checkpoint's data / feature-spec hashes differ from this run's."""
    cpu_threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    export_final: bool = True
    """Write ``output_dir/final/`` (a native checkpoint directory) at the end."""
    tune_malloc: bool = True
    """On CPU, tune glibc malloc for training (fewer page faults on large activations; +5-24% on paper-base)."""
    keep_checkpoints: bool = True
    """False: delete ``checkpoints/`` once the run has finished and ``final/`` is written (they serve resuming only)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        object.__setattr__(self, "lr_multipliers", tuple((str(p), float(f)) for p, f in self.lr_multipliers))
        object.__setattr__(self, "freeze", tuple(str(p) for p in self.freeze))
        errors = []
        if self.max_steps is None and self.epochs is None:
            errors.append("set max_steps and/or epochs")
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            errors.append(f"epochs must be a positive number, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every is not None and self.eval_every < 1:
            errors.append(f"eval_every must be >= 1 or None, got {self.eval_every}")
        if not self.lr > 0:
            errors.append(f"lr must be positive, got {self.lr}")
        bad = [f"{p!r}: {f}" for p, f in self.lr_multipliers if not (f > 0 and math.isfinite(f)) or not p]
        if bad:
            errors.append(f"lr_multipliers need a non-empty prefix and a positive factor, got {', '.join(bad)}")
        if any(not p for p in self.freeze):
            errors.append("freeze prefixes must be non-empty")
        if self.weight_decay < 0:
            errors.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            errors.append(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not self.adam_eps > 0:
            errors.append(f"adam_eps must be positive, got {self.adam_eps}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            errors.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction <= 1:
            errors.append(f"warmup_fraction must lie in [0, 1], got {self.warmup_fraction}")
        if self.clip_norm is not None and self.clip_norm < 0:
            errors.append(f"clip_norm must be >= 0 or None, got {self.clip_norm}")
        if self.num_workers < 0:
            errors.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            errors.append(f"cpu_threads must be >= 1 or None, got {self.cpu_threads}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            errors.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if errors:
            raise TrainerConfigError("invalid TrainerConfig: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (paths as strings, tuples as lists)."""
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["adam_betas"] = list(self.adam_betas)
        out["lr_multipliers"] = [list(pair) for pair in self.lr_multipliers]
        out["freeze"] = list(self.freeze)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainerConfigError(f"unknown TrainerConfig keys {unknown}")
        return cls(**data)


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    """Optimizer steps completed, counting those before a resume."""
    epochs: float
    """Passes over the data completed (fractional)."""
    final_loss: float
    """Training loss of the last logged step, averaged over ranks (nan if never logged)."""
    samples_per_s: float
    """Training throughput of this process's steps, all ranks together (checkpoint and eval time excluded)."""
    checkpoint: Path | None
    """The newest checkpoint folder."""
    final_dir: Path | None
    """``output_dir/final`` (native checkpoint directory), when exported."""
    resumed_from: Path | None
    """The checkpoint this run resumed from, if any."""
    resumed_step: int
    """The step this run started at (0 for a fresh run)."""
    world_size: int
    """Number of processes that trained."""
    seconds: float
    """Time spent in training steps by this process."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The last ``eval_fn`` result."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged training row (loss, its parts, grad norm, lr, ...), averaged over ranks."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("checkpoint", "final_dir", "resumed_from"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out
