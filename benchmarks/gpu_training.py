"""``paper-base`` pretraining on one GPU through the real ``Trainer`` (bf16 autocast): samples/s and model FLOPs
utilisation (MFU), into the ``training_gpu`` section of ``benchmarks/RESULTS.md``.

Prepared for a lent H200 (a few minutes; ``benchmarks/gpu_training.sh`` runs the variants and writes the section).
Without a CUDA device it stops at once with a clear message; ``--dry-run`` runs the same code path on the CPU with
the ``tiny`` preset and small sizes (no bf16 there: the trainer never autocasts on CPU).

Data: a pool of synthetic pretraining examples (``components.bench.throughput.synthetic_batch``: 36 tokens, 37 regions, the
paper's D = 2048 / C = 1601, random lengths and ~15% masking) kept ON the GPU; the DataLoader hands the trainer
index tensors and the loss function gathers the batch on the device.  So the input pipeline is not measured
(the CPU pipeline gives ~360 items/s per core at these sizes: see the ``data_pipeline`` section).

Model FLOPs per example (``analytic_flops``; 2 FLOPs per multiply-add; t / r real tokens / regions, T / R padded
lengths, m / q masked words / regions; Ht, Hv, C hidden sizes, It, Iv feed-forward sizes, D feature size,
K classes, V vocabulary; projections skip padding, attention runs on the padded lengths)::

    forward = 2R(D + 5)Hv                                              vision embeddings (padded)
            + Lt [2t(4Ht^2 + 2 Ht It) + 4T^2 Ht] + Lv [2r(4Hv^2 + 2 Hv Iv) + 4R^2 Hv]     self-attention layers
            + Nc [2t(4 Ht C + 2 Ht It) + 2r(4 Hv C + 2 Hv Iv) + 8 T R C]                 co-attention blocks
            + 2C(Ht + Hv) + 4C + 2m(Ht^2 + Ht V) + 2q(Hv^2 + Hv K)         poolers, alignment, masked heads
    train   = 3 x forward                                              (backward = 2 x forward)

MFU = samples/s x train FLOPs per example / peak (H200 dense bf16: 989 TFLOP/s).  ``torch.utils.flop_counter``
on one real forward + backward is reported next to it as a check of the formula.

    python3 benchmarks/gpu_training.py --batch-size 256         # on the GPU machine
    .venv/bin/python benchmarks/gpu_training.py --dry-run       # anywhere
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if str(ROOT) not in sys.path else []  # run as a script from anywhere
NAME = "training_gpu"
H200_BF16_DENSE_TFLOPS = 989.0


def analytic_flops(config: Any, batch: dict[str, torch.Tensor]) -> float:
    """Training FLOPs (3 x forward) per example of ``batch``, by the formula in the module docstring."""
    t_cfg, v_cfg, co = config.text, config.vision, config.coattention
    ht, hv, c, it, iv = (
        t_cfg.hidden_size,
        v_cfg.hidden_size,
        co.hidden_size,
        t_cfg.intermediate_size,
        v_cfg.intermediate_size,
    )
    b, T = batch["input_ids"].shape
    R = batch["features"].shape[1]
    t = batch["attention_mask"].sum().item() / b
    r = batch["region_mask"].sum().item() / b
    m = (batch["masked_lm_labels"] >= 0).sum().item() / b
    q = (batch["region_labels"] == 1).sum().item() / b
    forward = (
        2 * R * (v_cfg.feature_size + v_cfg.location_size) * hv
        + t_cfg.num_layers * (2 * t * (4 * ht * ht + 2 * ht * it) + 4 * T * T * ht)
        + v_cfg.num_layers * (2 * r * (4 * hv * hv + 2 * hv * iv) + 4 * R * R * hv)
        + co.num_blocks * (2 * t * (4 * ht * c + 2 * ht * it) + 2 * r * (4 * hv * c + 2 * hv * iv) + 8 * T * R * c)
        + 2 * c * (ht + hv) + 4 * c
        + 2 * m * (ht * ht + ht * t_cfg.vocab_size) + 2 * q * (hv * hv + hv * v_cfg.target_size)
    )  # fmt: skip
    return 3 * forward


def counted_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Any) -> float:
    """FLOPs per example that ``torch.utils.flop_counter`` sees in one forward + backward (train mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["input_ids"].shape[0]


def build_pool(config: Any, n: int, text_len: int, regions: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``n`` synthetic pretraining examples on ``device`` (chunks of 256 with their own seeds)."""
    from components.bench.throughput import synthetic_batch

    chunks = [synthetic_batch(config, min(256, n - i), text_len, regions, seed=i) for i in range(0, n, 256)]
    return {k: torch.cat([ch[k] for ch in chunks]).to(device) for k in chunks[0]}


class PoolIndex(torch.utils.data.Dataset):
    """Item i is just i (the sampler may hand ``(epoch, i)`` pairs)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | tuple[int, int]) -> int:
        return key[1] if isinstance(key, tuple) else key


def collate_indices(items: list[int]) -> torch.Tensor:
    return torch.tensor(items, dtype=torch.long)


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """Train ``warmup + steps + 1`` steps with the real Trainer; time windows of steps between CUDA syncs."""
    from components.data.sampler import ResumableDistributedSampler
    from components.training import Trainer, TrainerConfig
    from model import ViLBertForPretraining, preset

    device = torch.device("cpu" if a.dry_run else "cuda")
    config = preset(a.preset)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else _nothing
    if a.dry_run:
        torch.set_num_threads(1)  # a shared CPU: two threads of a tiny model only wait for each other
    started = time.perf_counter()
    pool = build_pool(config, a.pool, a.text_len, a.regions, device)
    torch.manual_seed(0)
    model = ViLBertForPretraining(config).to(device)
    model.vilbert.check_inputs = a.check_inputs
    probe = {k: v[: a.batch_size] for k, v in pool.items()}
    counted = counted_flops(model, probe, autocast)
    analytic_probe = analytic_flops(config, probe)
    analytic = analytic_flops(config, pool)  # the pool's mean example: what the timed steps draw from
    setup_s = time.perf_counter() - started

    total = a.warmup + a.steps + 1
    size = max(a.steps // a.windows, 1)
    marks = {a.warmup + 1 + i * size for i in range(a.windows + 1)}  # loss calls at which the clock is read
    clock: dict[int, float] = {}
    calls = 0

    def loss_fn(m: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal calls
        calls += 1
        if calls in marks or calls == total:
            sync()  # every step queued so far has finished
            clock[calls] = time.perf_counter()
        batch = {k: v.index_select(0, idx) for k, v in pool.items()}
        return m(**batch).loss, {}  # no metrics: each would be a host sync per step

    out_dir = Path(tempfile.mkdtemp(prefix="gpu-training-"))
    try:
        trainer_config = TrainerConfig(
            output_dir=out_dir, max_steps=total, batch_size=a.batch_size, checkpoint_every=10**9,
            log_every=total, progress=False, device=device.type, bf16=True, export_final=False,
            cpu_threads=1 if a.dry_run else None,
        )  # fmt: skip
        sampler = ResumableDistributedSampler(a.pool, seed=0)
        trainer = Trainer(trainer_config, model, PoolIndex(a.pool), collate_indices, loss_fn, sampler=sampler)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = trainer.train()
        sync()
        ended = time.perf_counter()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    edges = sorted(k for k in clock if k in marks)
    windows = [a.batch_size * (j - i) / (clock[j] - clock[i]) for i, j in zip(edges, edges[1:], strict=False)]
    samples_per_s = statistics.median(windows)
    peak = a.peak_tflops * 1e12
    return {
        "name": a.tag, "preset": a.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu (dry run)", "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": device.type == "cuda",
        "batch_size": a.batch_size, "text_len": a.text_len, "regions": a.regions, "pool": a.pool,
        "check_inputs": a.check_inputs, "warmup": a.warmup, "steps": a.steps, "windows_samples_per_s": windows,
        "samples_per_s": samples_per_s, "step_ms": 1000 * a.batch_size / samples_per_s,
        "train_flops_per_sample": analytic, "counted_flops_per_sample_probe": counted,
        "analytic_flops_per_sample_probe": analytic_probe, "model_tflops": samples_per_s * analytic / 1e12,
        "mfu": samples_per_s * analytic / peak, "mfu_counted": samples_per_s * counted / peak,
        "peak_tflops": a.peak_tflops, "final_loss": result.final_loss, "trainer_samples_per_s": result.samples_per_s,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "setup_s": setup_s, "final_checkpoint_s": ended - clock[total], "total_s": time.perf_counter() - started,
    }  # fmt: skip


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def render(results: list[dict[str, Any]], command: str) -> str:
    """The Markdown section for one or more result JSONs of real GPU runs."""
    r0 = results[0]
    rows = [
        f"| {r['name']} | {r['batch_size']} | {'on' if r['check_inputs'] else 'off'} | **{r['samples_per_s']:.0f}** "
        f"| {', '.join(f'{w:.0f}' for w in r['windows_samples_per_s'])} | {r['step_ms']:.1f} "
        f"| {r['model_tflops']:.0f} | **{100 * r['mfu']:.1f}%** | {100 * r['mfu_counted']:.1f}% "
        f"| {r['peak_gpu_mem_gib']:.1f} | {r['final_checkpoint_s']:.1f} | {r['total_s']:.0f} |"
        for r in results
    ]
    return "\n".join([
        f"<!-- {NAME}:start -->",
        "## `paper-base` pretraining on one GPU: samples/s and MFU (bf16 autocast, real Trainer)",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; device: {r0['device']}, torch "
        f"{r0['torch']}, CUDA {r0['cuda']}",
        f"- Command: `{command}`",
        f"- `Trainer` defaults on CUDA: bf16 autocast, fused AdamW, clipping 1.0, warm-up schedule; {r0['warmup']} "
        f"warm-up steps, then {r0['steps']} timed steps in windows between CUDA synchronisations (median window "
        "shown, all listed); the last step with the final checkpoint (weights + AdamW state, sha256 manifest, "
        "fsync) is timed apart.",
        f"- Data: {r0['pool']} synthetic examples ({r0['text_len']} tokens, {r0['regions']} regions, random real "
        "lengths, ~15% masked; `components.bench.throughput.synthetic_batch`) held on the GPU and gathered by index in the loss "
        "function: the CPU input pipeline is NOT part of these figures.",
        f"- MFU = samples/s x model FLOPs per example / {r0['peak_tflops']:.0f} TFLOP/s (H200 dense bf16). Model "
        f"FLOPs per example = 3 x the analytic forward count (formula in `benchmarks/gpu_training.py`): "
        f"{r0['train_flops_per_sample'] / 1e9:.1f} GFLOP; `torch.utils.flop_counter` on one real forward + "
        f"backward of the first batch: {r0['counted_flops_per_sample_probe'] / 1e9:.1f} GFLOP (formula on that "
        f"batch: {r0['analytic_flops_per_sample_probe'] / 1e9:.1f}); MFU (counted) uses the latter.",
        "",
        "| run | batch | input checks | samples/s | windows samples/s | step ms | model TFLOP/s | MFU | MFU (counted) "
        "| peak GPU memory GiB | last step + final checkpoint s | run s (setup + training) |",
        "|" + "---|" * 12,
        *rows,
        "",
        f"<!-- {NAME}:end -->",
    ])  # fmt: skip


def render_pending() -> str:
    """What the section says before a GPU run: no figures, how to get them."""
    return "\n".join([
        f"<!-- {NAME}:start -->",
        "## `paper-base` pretraining on one GPU: samples/s and MFU (bf16 autocast, real Trainer)",
        "",
        "Not measured yet: no GPU was available where this was written. On a machine with one CUDA GPU, from the "
        "repository root: `bash benchmarks/gpu_training.sh` (about 3 minutes on an H200; writes this section, and "
        "the JSON results and the section to `$OUT` when set). `python benchmarks/gpu_training.py --dry-run` "
        "runs the same code path on a CPU with the `tiny` preset.",
        "",
        f"<!-- {NAME}:end -->",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper-base")
    p.add_argument("--batch-size", type=int, default=256, help="examples per step")
    p.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--windows", type=int, default=5, help="timed steps are cut into this many windows")
    p.add_argument("--pool", type=int, default=1024, help="synthetic examples held on the device")
    p.add_argument("--text-len", type=int, default=36)
    p.add_argument("--regions", type=int, default=37, help="regions per example, the whole-image token included")
    p.add_argument("--no-check-inputs", dest="check_inputs", action="store_false",
                   help="turn off the model's per-batch input validation (host syncs)")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="dense bf16 peak of the GPU")
    p.add_argument("--tag", default="", help="row name (default: from the settings)")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke mode: tiny preset, tiny sizes, no results file")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md (the .sh renders at the end)")
    p.add_argument("--render", nargs="+", type=Path, help="only write the section from these result JSONs")
    p.add_argument("--pending", action="store_true", help="only write the 'not measured yet' section")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--command", help="the command to show in the section (default: this one)")
    a = p.parse_args(argv)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    command = a.command or "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    if a.render or a.pending:
        section = render([json.loads(f.read_text()) for f in a.render], command) if a.render else render_pending()
        _write(section, a.results, out)
        return 0
    if a.dry_run:
        a.preset, a.batch_size, a.pool, a.warmup, a.steps, a.windows = "tiny", 4, 16, 2, 4, 2
    elif not torch.cuda.is_available():
        print("gpu_training: no CUDA device is available (torch.cuda.is_available() is False). This benchmark "
              "needs a GPU; use --dry-run for the CPU smoke mode.", file=sys.stderr)  # fmt: skip
        return 2
    a.tag = a.tag or f"{a.preset}-b{a.batch_size}" + ("" if a.check_inputs else "-nocheck")
    result = measure(a)
    print(json.dumps(result), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"gpu_training-{a.tag}.json").write_text(json.dumps(result, indent=2))
    if not a.dry_run and not a.no_write:
        _write(render([result], command), a.results, out)
    return 0


def _write(section: str, results: Path, out: Path | None) -> None:
    if str(ROOT / "benchmarks") not in sys.path:  # imported as benchmarks.gpu_training (the tests)
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from _results import update_section

    update_section(results, section, NAME)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{NAME}.md").write_text(section + "\n")
    print(section)


if __name__ == "__main__":
    sys.exit(main())
