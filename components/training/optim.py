"""AdamW with BERT-style weight-decay groups, and the linear warm-up / linear decay schedule.

Both keep their state in plain types (numbers, lists, tensors), so a checkpoint of them loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def parameter_groups(model: nn.Module, weight_decay: float, lr: float,
                     multipliers: Sequence[tuple[str, float]] = ()) -> list[dict]:  # fmt: skip
    """Matrices decay; biases, LayerNorm and other 1-D parameters do not (as in BERT).  With ``multipliers``
    (``(name prefix, factor)``, first match counts) the parameters under a prefix form groups of their own at
    ``lr * factor``.

    Frozen parameters (``requires_grad=False``) are left out."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        factor = next((f for prefix, f in multipliers if name.startswith(prefix)), 1.0)
        groups.setdefault((factor, param.ndim >= 2), []).append(param)
    out = []
    for (factor, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, kv[0][0], not kv[0][1])):
        group: dict = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if factor != 1.0:
            group["lr"] = lr * factor
        out.append(group)
    return out


def freeze_parameters(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Stop training the parameters whose names start with one of ``prefixes``; returns their names.  A prefix
    that matches nothing is an error (a misspelt name would otherwise train everything silently)."""
    if not prefixes:
        return []
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(name.startswith(p) for name in names)]
    if unmatched:
        raise ValueError(f"freeze: no parameter name starts with {', '.join(map(repr, unmatched))}")
    frozen = []
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    log.info("frozen: %d tensors (%d values) under %s", len(frozen),
             sum(p.numel() for n, p in model.named_parameters() if n in set(frozen)), ", ".join(prefixes))  # fmt: skip
    return frozen


def _fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """The fused kernel needs floating-point parameters on a device type that has it (CUDA, and CPU in
    recent PyTorch); the probe builds a throw-away optimizer on a scalar of that device."""
    params = list(params)
    if not params or not all(p.is_floating_point() for p in params):
        return False
    devices = {p.device.type for p in params}
    if len(devices) != 1:
        return False
    probe = torch.zeros(1, device=params[0].device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], lr=1e-3, fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    multipliers: Sequence[tuple[str, float]] = (),
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (``multipliers``: see :func:`parameter_groups`).
    ``fused=None`` uses the fused kernel where supported."""
    groups = parameter_groups(model, weight_decay, lr, multipliers)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = _fused_supported(params)
    log.debug("AdamW: %d tensors, fused=%s", len(params), fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


class WarmupLinearDecay:
    """LR multiplier: 0 -> 1 linearly over ``warmup`` steps, then 1 -> 0 linearly until ``total`` steps.

    A class (not a closure) so that ``LambdaLR.state_dict()`` records its two integers."""

    def __init__(self, warmup: int, total: int):
        if total < 1 or not 0 <= warmup <= total:
            raise ValueError(f"need 0 <= warmup ({warmup}) <= total ({total}) and total >= 1")
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)  # never exactly 0: the first step already learns a little
        if self.total == self.warmup:
            return 1.0
        return max(0.0, (self.total - step) / (self.total - self.warmup))


def warmup_linear_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """The BERT schedule as a ``LambdaLR`` (one ``scheduler.step()`` per optimizer step)."""
    return LambdaLR(optimizer, WarmupLinearDecay(warmup_steps, total_steps))


def resolve_warmup(total_steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    """Warm-up length: explicit steps win, else ``round(fraction * total)``, capped at ``total_steps``."""
    steps = warmup_steps if warmup_steps is not None else round(warmup_fraction * total_steps)
    return min(max(steps, 0), total_steps)
