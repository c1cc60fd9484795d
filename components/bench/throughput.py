"""Training-throughput benchmark: this ViLBERT against the original (jiasenlu/vilbert_beta).

One *measurement* times full pretraining steps (forward with the three losses, backward, AdamW step,
``zero_grad``) in train mode on a deterministic synthetic batch.  :func:`benchmark` runs every measurement in
a fresh Python process (``python -m components.bench.throughput --child ...``) so that peak RSS (``ru_maxrss``,
monotone and process-wide) belongs to one implementation only.  Given the original source tree it also checks, in eval mode
and with identical weights, that both implementations give the same losses and gradients on the batch.

The original is imported from its source tree at run time (``<src>/vilbert/vilbert.py``) as the throwaway
package ``_vilbert_reference``; nothing of it is part of this package.

CLI: ``python -m components.bench.throughput --preset demo --steps 20 --reference-src /path/to/vilbert_beta``
prints JSON (``vilbert model bench`` prints a table).
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

from components.data.regions import DEFAULT_MAX_REGIONS
from components.training.malloc import MALLOC, tune_malloc
from model.config import ViLBertConfig, preset
from model.convert import export_official_state_dict, official_key_map
from model.heads import ViLBertForPretraining

REFERENCE_PACKAGE = "_vilbert_reference"
LOSS_NAMES = ("masked_lm_loss", "masked_region_loss", "alignment_loss")
LOSS_RTOL = 1e-4  # losses must agree to this relative tolerance ("identical numerics")
GRAD_RTOL = 1e-3  # per-tensor max |diff| / max |grad|
QUIET_LOAD = 0.05  # a step is "clean" when other processes used less than this share of the CPUs meanwhile
MAX_STEP_FACTOR = 8  # run at most warmup + 8 x steps steps to collect `steps` clean ones
#: torch.optim.AdamW variants (the same one is used for both implementations); torch's CPU default is the loop.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "adamw-foreach": {"foreach": True},
    "adamw-fused": {"fused": True},
}


def synthetic_batch(
    config: ViLBertConfig, batch_size: int = 8, text_len: int = 36, regions: int = DEFAULT_MAX_REGIONS, seed: int = 0
) -> dict[str, Tensor]:
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
        "input_ids": input_ids,
        "features": features,
        "boxes": boxes,
        "token_type_ids": torch.zeros_like(input_ids),
        "attention_mask": attention_mask,
        "region_mask": region_mask,
        "masked_lm_labels": masked_lm_labels,
        "region_labels": region_labels,
        "region_targets": region_targets,
        "alignment_labels": torch.randint(0, 2, (b,), generator=g),
    }


def reference_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same batch as the original's keyword arguments (its region labels/targets skip region 0)."""
    return {
        "input_ids": batch["input_ids"],
        "image_feat": batch["features"],
        "image_loc": batch["boxes"],
        "token_type_ids": batch["token_type_ids"],
        "attention_mask": batch["attention_mask"],
        "image_attention_mask": batch["region_mask"],
        "masked_lm_labels": batch["masked_lm_labels"],
        "image_label": batch["region_labels"][:, 1:],
        "image_target": batch["region_targets"][:, 1:],
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

    setattr(utils, "cached_path", cached_path)  # noqa: B010 (a module attribute mypy cannot know)
    sys.modules[REFERENCE_PACKAGE], sys.modules[utils.__name__] = package, utils
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with contextlib.redirect_stdout(sys.stderr):
        spec.loader.exec_module(module)
    return module


def build_reference(
    config: ViLBertConfig, weights: ViLBertForPretraining | str | Path, src: str | Path
) -> torch.nn.Module:
    """The original ``BertForMultiModalPreTraining`` holding exactly our weights (strict load): those of a
    model of ours, or an official state dict saved by :func:`check_parity` (memory-mapped while copied, so
    that no freed heap is left behind to flatter the original's memory figures)."""
    ref = load_reference(src)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its predict_feature option
        model = ref.BertForMultiModalPreTraining(ref.BertConfig.from_dict(config.to_official()))
    if isinstance(weights, torch.nn.Module):
        state = export_official_state_dict(weights)
    else:
        state = torch.load(weights, mmap=True, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def _losses(model: torch.nn.Module, kind: str, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    if kind == "ours":
        out = model(**batch)
        return out.masked_lm_loss, out.masked_region_loss, out.alignment_loss
    return tuple(x.squeeze(0) for x in model(**reference_inputs(batch)))


def check_parity(
    config: ViLBertConfig, batch: dict[str, Tensor], seed: int, src: str | Path, save_weights: str | None = None
) -> dict[str, Any]:
    """Eval mode, same weights, same batch: the three losses and every parameter gradient of both models.
    ``save_weights``: also save the official state dict there (for the original's timing run)."""
    torch.manual_seed(seed)
    ours = ViLBertForPretraining(config).eval()
    if save_weights:
        torch.save(export_official_state_dict(ours), save_weights)
    ref = build_reference(config, ours, src).eval()
    ours_l, ref_l = _losses(ours, "ours", batch), _losses(ref, "reference", batch)
    torch.stack(ours_l).sum().backward()
    torch.stack(ref_l).sum().backward()
    result: dict[str, Any] = {"losses": {}}
    for name, a_t, r_t in zip(LOSS_NAMES, ours_l, ref_l, strict=True):
        a, r = float(a_t.detach()), float(r_t.detach())
        result["losses"][name] = {
            "ours": a,
            "reference": r,
            "abs_diff": abs(a - r),
            "rel_diff": abs(a - r) / max(abs(r), 1e-12),
        }
    max_loss_rel_diff = max(float(x["rel_diff"]) for x in result["losses"].values())
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    pairs: list[tuple[Tensor, Tensor]] = []  # (ours, reference) gradients of the tensors the original trains
    for native, officials in official_key_map(ours).items():
        grad = ours_params[native].grad
        if grad is None:  # frozen layers
            continue
        for key, g in zip(officials, grad.chunk(len(officials), 0) if len(officials) > 1 else (grad,), strict=True):
            r_grad = ref_params[key].grad if key in ref_params else None
            if r_grad is not None:
                pairs.append((g, r_grad))
    # Per tensor max|diff| / max|ref|, the denominator floored at 1e-4 of the largest gradient: attention key
    # biases have a zero gradient in theory (softmax is shift-invariant), ~1e-11 of rounding noise in practice.
    scale = max(float(r.abs().max()) for _, r in pairs)
    worst = max(float((g - r).abs().max()) / max(float(r.abs().max()), 1e-4 * scale) for g, r in pairs)
    result.update(
        max_loss_rel_diff=max_loss_rel_diff,
        grad_tensors_compared=len(pairs),
        max_grad_rel_diff=worst,
        ok=max_loss_rel_diff < LOSS_RTOL and worst < GRAD_RTOL,
    )
    return result


def _busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all processes) so far."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def wait_until_quiet(max_wait_s: float = 300.0, threshold: float = QUIET_LOAD) -> float:
    """Wait (up to ``max_wait_s``) for a second in which other processes use < ``threshold`` of the CPUs;
    returns the seconds waited.  Two busy threads on two cores slow a 2-thread run many-fold."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        busy = _busy_cpu_s()
        time.sleep(1.0)
        if (_busy_cpu_s() - busy) / (psutil.cpu_count() or 1) < threshold:
            break
    return time.monotonic() - start


def time_training(
    model: torch.nn.Module,
    kind: str,
    batch: dict[str, Tensor],
    steps: int,
    warmup: int,
    device: torch.device,
    optimizer: str = "adamw",
    max_quiet_wait_s: float = 0.0,
) -> dict[str, Any]:
    """Train-mode steps (forward + 3 losses, backward, AdamW, zero_grad); memory is of this process.

    The machine may be shared: training starts after waiting (up to ``max_quiet_wait_s`` in all) for a quiet
    second, and a timed step during which other processes used >= :data:`QUIET_LOAD` of the CPUs is discarded,
    followed by another wait, and replaced, up to ``warmup + MAX_STEP_FACTOR * steps`` steps in all.  If too
    few clean steps remain, the least disturbed others fill in (``clean_steps`` says how many were clean).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **OPTIMIZERS[optimizer])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    waited = wait_until_quiet(max_quiet_wait_s) if max_quiet_wait_s > 0 else 0.0
    me, ncpu = psutil.Process(), psutil.cpu_count() or 1
    rss_start = me.memory_info().rss
    usage_start = resource.getrusage(resource.RUSAGE_SELF)
    clean: list[float] = []
    disturbed: list[tuple[float, float]] = []  # (seconds, other processes' CPU share)
    done, last, faults = 0, float("nan"), 0
    while len(clean) < steps and done < warmup + MAX_STEP_FACTOR * steps:
        busy, own, flt = _busy_cpu_s(), sum(me.cpu_times()[:2]), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        sync()
        start = time.perf_counter()
        loss = torch.stack(_losses(model, kind, batch)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        last, done = float(loss.detach()), done + 1
        if done <= warmup:
            continue
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt
        other = max((_busy_cpu_s() - busy) - (sum(me.cpu_times()[:2]) - own), 0.0) / (elapsed * ncpu)
        if other < QUIET_LOAD:
            clean.append(elapsed)
        else:
            disturbed.append((elapsed, other))
            if waited < max_quiet_wait_s:  # let the other job finish before trying again
                waited += wait_until_quiet(min(60.0, max_quiet_wait_s - waited))
    timed = clean + [t for t, _ in sorted(disturbed, key=lambda d: d[1])][: steps - len(clean)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    batch_size = batch["input_ids"].shape[0]
    out = {
        "samples_per_s": batch_size * len(timed) / sum(timed),
        "step_ms": 1000 * statistics.median(timed),
        "step_ms_min": 1000 * min(timed),
        "step_ms_max": 1000 * max(timed),
        "clean_steps": len(clean),
        "discarded_steps": len(disturbed),
        "max_other_load_discarded": max((o for _, o in disturbed), default=0.0),
        "peak_rss_mb": peak / 2**20,
        "rss_before_training_mb": rss_start / 2**20,
        # ru_maxrss and the current RSS are counted differently (a few KiB apart): never below zero
        "train_rss_delta_mb": max(peak - rss_start, 0) / 2**20,
        "peak_reached_during_training": peak > usage_start.ru_maxrss * 1024,
        "last_loss": last,
        "page_faults_per_step": faults / (done - warmup),
        "waited_for_quiet_s": round(waited, 1),
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure(
    kind: str,
    preset_name: str,
    batch_size: int,
    text_len: int,
    regions: int,
    steps: int,
    warmup: int,
    threads: int | None,
    reference_src: str | None,
    seed: int,
    device: str = "cpu",
    optimizer: str = "adamw",
    max_quiet_wait_s: float = 0.0,
    weights: str | None = None,
    malloc: str = "default",
) -> dict[str, Any]:
    """One measurement in THIS process.  ``kind``: ``ours``, ``reference`` or ``parity`` (always on CPU).

    ``weights``: the official state-dict file that ``parity`` writes and ``reference`` reads (without it
    ``reference`` builds our model and exports it).  Thread count and global RNG state are restored; a
    ``malloc`` setting is not (it is meant for the fresh processes of :func:`benchmark`)."""
    if kind not in ("ours", "reference", "parity"):
        raise ValueError(f"unknown measurement {kind!r}")
    if kind != "ours" and not reference_src:
        raise ValueError(f"measurement {kind!r} needs reference_src")
    saved_threads = torch.get_num_threads()
    tune_malloc(malloc)
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            # the reference pools [CLS] through ReLU only; the pooling options cost nothing measurable
            config = preset(preset_name).reference_pooling()
            batch = synthetic_batch(config, batch_size, text_len, regions, seed)
            if kind == "parity":
                return check_parity(config, batch, seed, str(reference_src), weights)
            dev = torch.device(device)
            torch.manual_seed(seed)
            model: torch.nn.Module
            if kind == "ours":
                model = ViLBertForPretraining(config)
            elif weights and Path(weights).exists():
                model = build_reference(config, weights, str(reference_src))
            else:
                model = build_reference(config, ViLBertForPretraining(config), str(reference_src))
            gc.collect()
            torch.manual_seed(seed + 1)  # the same dropout stream for both
            batch = {k: x.to(dev) for k, x in batch.items()}
            return time_training(model.to(dev), kind, batch, steps, warmup, dev, optimizer, max_quiet_wait_s)
    finally:
        torch.set_num_threads(saved_threads)


def _isolated(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter and return its result."""
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "components.bench.throughput",
            "--child",
            kind,
            "--spec",
            json.dumps(spec),
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"benchmark child {kind!r} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def benchmark(
    preset_name: str = "demo",
    batch_size: int = 8,
    text_len: int = 36,
    regions: int = DEFAULT_MAX_REGIONS,
    steps: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    reference_src: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    repeats: int = 1,
    optimizer: str = "adamw",
    malloc: str = "default",
    isolate: bool = True,
    max_quiet_wait_s: float = 300.0,
) -> dict[str, Any]:
    """Samples/s and memory of ours (and of the original with ``reference_src``), each in its own process.

    With ``repeats`` > 1 the implementations are measured alternately that many times each and the fastest
    run of each (among those with only clean steps, if any) is reported; every run's samples/s is kept under
    ``runs``.  ``optimizer`` (:data:`OPTIMIZERS`) and ``malloc`` (:data:`MALLOC`) apply to
    both implementations.  ``isolate=False`` measures in this process (fast, for tests; peak RSS is
    then this process's).  Before timing, each measurement waits up to ``max_quiet_wait_s`` for other
    processes to leave the CPUs alone (0 = don't wait).  Ratios are ours / original: > 1 for samples/s is
    faster, < 1 for memory leaner.
    """
    if steps < 1 or warmup < 0 or repeats < 1 or optimizer not in OPTIMIZERS or malloc not in MALLOC:
        raise ValueError(
            f"need steps >= 1, warmup >= 0, repeats >= 1, optimizer in {sorted(OPTIMIZERS)}, malloc in {sorted(MALLOC)}"
        )
    spec: dict[str, Any] = dict(
        preset_name=preset_name,
        batch_size=batch_size,
        text_len=text_len,
        regions=regions,
        steps=steps,
        warmup=warmup,
        threads=threads,
        reference_src=reference_src,
        seed=seed,
        device=device,
        optimizer=optimizer,
        malloc=malloc,
        max_quiet_wait_s=max_quiet_wait_s,
    )

    def run(kind: str) -> dict[str, Any]:
        return _isolated(kind, spec) if isolate else measure(kind, **spec)

    result: dict[str, Any] = {
        "preset": preset_name,
        "batch_size": batch_size,
        "text_len": text_len,
        "regions": regions,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "optimizer": optimizer,
        "malloc": malloc,
        "threads": threads or torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seed": seed,
        "parity": None,
        "ours": None,
        "reference": None,
        "ratios": None,
    }
    kinds = ("ours", "reference") if reference_src else ("ours",)
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        spec["weights"] = str(Path(tmp) / "official_state_dict.pt")
        if reference_src:
            result["parity"] = run("parity")
        for _ in range(repeats):
            for kind in kinds:
                runs[kind].append(run(kind))
    for kind in kinds:
        best = max(runs[kind], key=lambda r: (r["clean_steps"] >= steps, r["samples_per_s"]))
        result[kind] = {**best, "runs": [round(r["samples_per_s"], 3) for r in runs[kind]]}
    if reference_src:
        ours, ref = result["ours"], result["reference"]
        result["ratios"] = {
            key: ours[key] / ref[key]
            for key in ("samples_per_s", "peak_rss_mb", "train_rss_delta_mb", "cuda_max_allocated_mb")
            if key in ref and ref[key]
        }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, kind in (
        ("preset", "demo", str),
        ("batch-size", 8, int),
        ("text-len", 36, int),
        ("regions", DEFAULT_MAX_REGIONS, int),
        ("steps", 10, int),
        ("warmup", 2, int),
        ("threads", None, int),
        ("reference-src", None, str),
        ("seed", 0, int),
        ("device", "cpu", str),
        ("repeats", 1, int),
        ("max-quiet-wait", 300.0, float),
    ):
        p.add_argument(f"--{flag}", default=default, type=kind)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    p.add_argument("--malloc", choices=sorted(MALLOC), default="default")
    p.add_argument("--child", choices=("ours", "reference", "parity"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        result = measure(a.child, **json.loads(a.spec))
        Path(a.out).write_text(json.dumps(result))
        return
    result = benchmark(
        a.preset,
        a.batch_size,
        a.text_len,
        a.regions,
        a.steps,
        a.warmup,
        a.threads,
        a.reference_src,
        a.seed,
        a.device,
        a.repeats,
        a.optimizer,
        a.malloc,
        max_quiet_wait_s=a.max_quiet_wait,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
