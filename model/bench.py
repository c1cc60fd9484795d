"""Training-throughput benchmark: this ViLBERT against the original (jiasenlu/vilbert_beta).

One *measurement* times full pretraining steps (forward with the three losses, backward, AdamW step,
``zero_grad``) in train mode on a deterministic synthetic batch.  :func:`benchmark` runs every measurement in
a fresh Python process (``python -m model.bench --child ...``) so that peak RSS (``ru_maxrss``, monotone and
process-wide) belongs to one implementation only.  Given the original source tree it also checks, in eval mode
and with identical weights, that both implementations give the same losses and gradients on the batch.

The original is imported from its source tree at run time (``<src>/vilbert/vilbert.py``) as the throwaway
package ``_vilbert_reference``; nothing of it is part of this package.

CLI: ``python -m model.bench --preset demo --steps 20 --reference-src /path/to/vilbert_beta`` prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor

from .config import ViLBertConfig, preset
from .convert import export_official_state_dict, official_key_map
from .heads import ViLBertForPretraining

REFERENCE_PACKAGE = "_vilbert_reference"
LOSS_NAMES = ("masked_lm_loss", "masked_region_loss", "alignment_loss")
LOSS_RTOL = 1e-4  # losses must agree to this relative tolerance ("identical numerics")
GRAD_RTOL = 1e-3  # per-tensor max |diff| / max |grad|


def synthetic_batch(config: ViLBertConfig, batch_size: int = 8, text_len: int = 36, regions: int = 37,
                    seed: int = 0) -> dict[str, Tensor]:
    """A deterministic pretraining batch in this package's conventions (labels cover all ``regions``).

    Text: [CLS] words [SEP] then padding (row 0 full length, others random lengths >= text_len / 2); 15% of
    the words supervised (80% -> [MASK], 10% random, 10% kept), at least one per row.  Regions: region 0 is
    the whole-image token (mean feature, box [0, 0, 1, 1, 1]); rows hold >= half the boxes, padding after;
    ~15% of real boxes masked (label 1, feature zeroed with p = 0.9) with softmax class-distribution targets.
    """
    t, v = config.text, config.vision
    b, n_t, n_r = batch_size, text_len, regions
    if n_t < 3 or n_t > t.max_position_embeddings or n_r < 2:
        raise ValueError(f"need 3 <= text_len <= {t.max_position_embeddings} and regions >= 2")
    g = torch.Generator().manual_seed(seed)
    cls_id, sep_id, mask_id = (101, 102, 103) if t.vocab_size > 1000 else (1, 2, 3)
    low = 1000 if t.vocab_size > 2000 else 4
    rows = torch.arange(b)

    lengths = torch.randint(max(3, n_t // 2), n_t + 1, (b,), generator=g)
    lengths[0] = n_t
    pos = torch.arange(n_t)[None]
    attention_mask = (pos < lengths[:, None]).long()
    input_ids = torch.randint(low, t.vocab_size, (b, n_t), generator=g) * attention_mask  # padding id 0
    input_ids[:, 0] = cls_id
    input_ids[rows, lengths - 1] = sep_id
    chosen = (torch.rand(b, n_t, generator=g) < 0.15) & (pos >= 1) & (pos < lengths[:, None] - 1)
    chosen[:, 1] = True
    masked_lm_labels = torch.where(chosen, input_ids, -1)
    r = torch.rand(b, n_t, generator=g)
    random_ids = torch.randint(low, t.vocab_size, (b, n_t), generator=g)
    input_ids = torch.where(chosen & (r < 0.8), mask_id, input_ids)
    input_ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, input_ids)

    n_boxes = torch.randint(max(1, (n_r - 1) // 2), n_r, (b,), generator=g)
    n_boxes[0] = n_r - 1
    rpos = torch.arange(n_r)[None]
    region_mask = (rpos <= n_boxes[:, None]).long()
    real = (rpos >= 1) & region_mask.bool()  # (B, R) real detector boxes
    features = torch.relu(torch.randn(b, n_r, v.feature_size, generator=g)) * real[..., None]
    corners = torch.rand(b, n_r, 2, 2, generator=g)
    lo, hi = corners.min(2).values, corners.max(2).values
    boxes = torch.cat([lo, hi, (hi - lo).prod(-1, keepdim=True)], -1) * real[..., None]
    features[:, 0] = features.sum(1) / n_boxes[:, None]
    boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    if config.region_objective == "regression":
        region_targets = features.clone()
    else:
        region_targets = torch.softmax(2.0 * torch.randn(b, n_r, v.target_size, generator=g), -1) * real[..., None]
    masked = (torch.rand(b, n_r, generator=g) < 0.15) & real
    masked[:, 1] = True
    region_labels = torch.where(masked, 1, -1)
    features = features * ~(masked & (torch.rand(b, n_r, generator=g) < 0.9))[..., None]
    return {
        "input_ids": input_ids, "features": features, "boxes": boxes,
        "token_type_ids": torch.zeros_like(input_ids), "attention_mask": attention_mask,
        "region_mask": region_mask, "masked_lm_labels": masked_lm_labels, "region_labels": region_labels,
        "region_targets": region_targets, "alignment_labels": torch.randint(0, 2, (b,), generator=g),
    }


def reference_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same batch as the original's keyword arguments (its region labels/targets skip region 0)."""
    return {
        "input_ids": batch["input_ids"], "image_feat": batch["features"], "image_loc": batch["boxes"],
        "token_type_ids": batch["token_type_ids"], "attention_mask": batch["attention_mask"],
        "image_attention_mask": batch["region_mask"], "masked_lm_labels": batch["masked_lm_labels"],
        "image_label": batch["region_labels"][:, 1:], "image_target": batch["region_targets"][:, 1:],
        "next_sentence_label": batch["alignment_labels"],
    }


def load_reference(src: str | Path) -> types.ModuleType:
    """Import ``<src>/vilbert/vilbert.py`` as ``_vilbert_reference.vilbert`` (``utils.cached_path`` stubbed)."""
    name = f"{REFERENCE_PACKAGE}.vilbert"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(src) / "vilbert" / "vilbert.py"
    if not path.is_file():
        raise FileNotFoundError(f"no original ViLBERT source at {path}")
    package = types.ModuleType(REFERENCE_PACKAGE)
    package.__path__ = []
    utils = types.ModuleType(f"{REFERENCE_PACKAGE}.utils")

    def cached_path(*_args: Any, **_kwargs: Any) -> str:
        raise OSError("the benchmark's reference import has no download cache")

    utils.cached_path = cached_path
    sys.modules[REFERENCE_PACKAGE], sys.modules[utils.__name__] = package, utils
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with contextlib.redirect_stdout(sys.stderr):
        spec.loader.exec_module(module)
    return module


def build_reference(config: ViLBertConfig, ours: ViLBertForPretraining, src: str | Path) -> torch.nn.Module:
    """The original ``BertForMultiModalPreTraining`` holding exactly ``ours``'s weights (strict load)."""
    ref = load_reference(src)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its predict_feature option
        model = ref.BertForMultiModalPreTraining(ref.BertConfig.from_dict(config.to_official()))
    model.load_state_dict(export_official_state_dict(ours), strict=True)
    return model


def _losses(model: torch.nn.Module, kind: str, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    if kind == "ours":
        out = model(**batch)
        return out.masked_lm_loss, out.masked_region_loss, out.alignment_loss
    return tuple(x.squeeze(0) for x in model(**reference_inputs(batch)))


def check_parity(config: ViLBertConfig, batch: dict[str, Tensor], seed: int, src: str | Path) -> dict[str, Any]:
    """Eval mode, same weights, same batch: the three losses and every parameter gradient of both models."""
    torch.manual_seed(seed)
    ours = ViLBertForPretraining(config).eval()
    ref = build_reference(config, ours, src).eval()
    ours_l, ref_l = _losses(ours, "ours", batch), _losses(ref, "reference", batch)
    torch.stack(ours_l).sum().backward()
    torch.stack(ref_l).sum().backward()
    result: dict[str, Any] = {"losses": {}}
    for name, a, r in zip(LOSS_NAMES, ours_l, ref_l):
        diff = abs(float(a) - float(r))
        result["losses"][name] = {"ours": float(a), "reference": float(r), "abs_diff": diff,
                                  "rel_diff": diff / max(abs(float(r)), 1e-12)}
    result["max_loss_rel_diff"] = max(x["rel_diff"] for x in result["losses"].values())
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    worst, compared = 0.0, 0
    for native, officials in official_key_map(ours).items():
        grads = ours_params[native].grad.chunk(len(officials), 0) if len(officials) > 1 else (ours_params[native].grad,)
        for key, g in zip(officials, grads):
            if key in ref_params and ref_params[key].grad is not None:
                r = ref_params[key].grad
                worst = max(worst, float((g - r).abs().max()) / max(float(r.abs().max()), 1e-12))
                compared += 1
    result.update(grad_tensors_compared=compared, max_grad_rel_diff=worst,
                  ok=result["max_loss_rel_diff"] < LOSS_RTOL and worst < GRAD_RTOL and compared > 0)
    return result


def time_training(model: torch.nn.Module, kind: str, batch: dict[str, Tensor], steps: int, warmup: int,
                  device: torch.device) -> dict[str, Any]:
    """Train-mode steps (forward + 3 losses, backward, AdamW, zero_grad); memory is of this process."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    rss_start = psutil.Process().memory_info().rss
    maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    times, last = [], float("nan")
    for _ in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss = torch.stack(_losses(model, kind, batch)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        last = float(loss.detach())
    timed = times[warmup:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    batch_size = batch["input_ids"].shape[0]
    out = {
        "samples_per_s": batch_size * len(timed) / sum(timed), "step_ms": 1000 * statistics.median(timed),
        "step_ms_min": 1000 * min(timed), "step_ms_max": 1000 * max(timed),
        "peak_rss_mb": peak / 2**20, "rss_before_training_mb": rss_start / 2**20,
        "train_rss_delta_mb": (peak - rss_start) / 2**20,
        "peak_reached_during_training": peak > maxrss_start, "last_loss": last,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure(kind: str, preset_name: str, batch_size: int, text_len: int, regions: int, steps: int, warmup: int,
            threads: int | None, reference_src: str | None, seed: int, device: str = "cpu") -> dict[str, Any]:
    """One measurement in THIS process.  ``kind``: ``ours``, ``reference`` or ``parity``."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    config = preset(preset_name)
    batch = synthetic_batch(config, batch_size, text_len, regions, seed)
    if kind == "parity":
        return check_parity(config, batch, seed, reference_src)
    batch = {k: x.to(dev) for k, x in batch.items()}
    torch.manual_seed(seed)
    model = ViLBertForPretraining(config)
    if kind == "reference":
        ours, model = model, build_reference(config, model, reference_src)
        del ours
    elif kind != "ours":
        raise ValueError(f"unknown measurement {kind!r}")
    gc.collect()
    torch.manual_seed(seed + 1)  # same dropout stream start for both
    return time_training(model.to(dev), kind, batch, steps, warmup, dev)


def _isolated(kind: str, **spec: Any) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter and return its result."""
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "model.bench", "--child", kind, "--spec", json.dumps(spec), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"benchmark child {kind!r} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def benchmark(preset_name: str = "demo", batch_size: int = 8, text_len: int = 36, regions: int = 37,
              steps: int = 10, warmup: int = 2, threads: int | None = None, reference_src: str | None = None,
              seed: int = 0, device: str = "cpu", isolate: bool = True) -> dict[str, Any]:
    """Samples/s and memory of ours (and of the original with ``reference_src``), each in its own process.

    ``isolate=False`` measures ours in this process (fast, for tests; peak RSS is then this process's).
    Ratios are ours / original: > 1 for samples/s means faster, < 1 for memory means leaner.
    """
    spec = dict(preset_name=preset_name, batch_size=batch_size, text_len=text_len, regions=regions, steps=steps,
                warmup=warmup, threads=threads, reference_src=reference_src, seed=seed, device=device)
    run = _isolated if isolate else (lambda kind, **s: measure(kind, **s))
    result: dict[str, Any] = {
        "preset": preset_name, "batch_size": batch_size, "text_len": text_len, "regions": regions,
        "steps": steps, "warmup": warmup, "threads": threads or torch.get_num_threads(), "device": device,
        "torch": torch.__version__, "python": platform.python_version(), "seed": seed,
        "parity": None, "ours": None, "reference": None, "ratios": None,
    }
    if reference_src:
        result["parity"] = run("parity", **spec)
    result["ours"] = run("ours", **spec)
    if reference_src:
        ours, ref = result["ours"], run("reference", **spec)
        result["reference"] = ref
        result["ratios"] = {key: ours[key] / ref[key] for key in
                            ("samples_per_s", "peak_rss_mb", "train_rss_delta_mb", "cuda_max_allocated_mb")
                            if key in ref and ref[key]}
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-len", type=int, default=36)
    p.add_argument("--regions", type=int, default=37)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reference-src", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=("ours", "reference", "parity"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        result = measure(a.child, **json.loads(a.spec))
        Path(a.out).write_text(json.dumps(result))
        return
    result = benchmark(a.preset, a.batch_size, a.text_len, a.regions, a.steps, a.warmup, a.threads,
                       a.reference_src, a.seed, a.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
