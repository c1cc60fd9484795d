"""Training throughput of this ViLBERT vs the original, written to ``benchmarks/RESULTS.md``.

Runs :func:`components.bench.throughput.benchmark` for each preset (default ``demo`` and ``paper-base``) and each variant
``OPTIMIZER/MALLOC`` (optionally ``PRESET:OPTIMIZER/MALLOC`` to run it for that preset only; both settings
apply to ours and the original alike), then replaces the ``model_throughput`` section of the results file
(other sections are kept).

    .venv/bin/python benchmarks/model_throughput.py --reference-src /work/vilbert_beta_src --threads 2 \
        --variants adamw/default adamw-fused/tuned
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from components.bench.throughput import OPTIMIZERS, benchmark
from components.training.malloc import MALLOC

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- model_throughput:start -->", "<!-- model_throughput:end -->"
GOALS = {"demo": 3.0, "paper-base": 1.5}  # the project's samples/s targets, ours / original


def per_preset(text: str, presets: list[str]) -> dict[str, int]:
    """``"8"`` -> the same for every preset; ``"demo=30,paper-base=6"`` -> per preset (others: first value)."""
    if "=" not in text:
        return dict.fromkeys(presets, int(text))
    pairs = dict(item.split("=", 1) for item in text.split(","))
    default = int(next(iter(pairs.values())))
    return {p: int(pairs.get(p, default)) for p in presets}


def variants_for(variants: list[str], preset: str) -> list[tuple[str, str]]:
    """``[PRESET:]OPTIMIZER/MALLOC`` strings -> the (optimizer, malloc) pairs that apply to ``preset``."""
    out = []
    for v in variants:
        only, _, rest = v.rpartition(":")
        optimizer, _, malloc = rest.partition("/")
        malloc = malloc or "default"
        if optimizer not in OPTIMIZERS or malloc not in MALLOC:
            raise SystemExit(f"bad variant {v!r}: optimizer in {sorted(OPTIMIZERS)}, malloc in {sorted(MALLOC)}")
        if not only or only == preset:
            out.append((optimizer, malloc))
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(results: list[dict[str, Any]], command: str, minutes: float) -> str:
    """The Markdown section: machine, command, throughput and memory per (preset, variant), numerics."""
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        START,
        "## Model training throughput: ours vs the original ViLBERT",
        "",
        f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; total benchmark time "
        f"{minutes:.1f} min",
        f"- Machine: `nproc` = {nproc}, CPU: {cpu_model()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"- Command: `{command}`",
        "- One step = forward with the three pretraining losses (masked words, masked regions, alignment), "
        "backward, AdamW step, zero_grad; train mode (dropout on), float32, synthetic batch "
        "(`components.bench.throughput.synthetic_batch`).  Each implementation runs in its own fresh process; "
        "samples/s = batch x steps / time of the timed steps after warmup; best of the repeats is shown "
        "(all runs in the last column).  Peak RSS = the child's `ru_maxrss`; train dRSS = peak minus RSS "
        "just before the first step (gradients, AdamW state, activations).  malloc `tuned` = glibc `mallopt` "
        "(no trimming, fixed 32 MiB mmap threshold, 256 MiB top pad; `components.training.malloc.MALLOC`) in both processes.  "
        "The machine is shared with other jobs: each run first waits for a quiet second, and a timed step "
        "during which other processes used >= 5% of the CPUs is discarded, waited out and replaced (up to 8x "
        "the steps); clean steps = how many of the reported steps were undisturbed.",
        "",
        "Throughput (speedup = ours / original samples/s):",
        "",
        "| preset | B x T x R | optimizer | malloc | steps (warmup) | ours samples/s | original samples/s "
        "| speedup | goal | ours step ms (median) | original step ms (median) | clean steps (ours / orig) "
        "| all runs samples/s (ours; orig) |",
        "|" + "---|" * 13,
    ]
    memory = [
        "Memory (RSS ratio = ours / original peak RSS):",
        "",
        "| preset | optimizer | malloc | ours peak RSS MB | original peak RSS MB | RSS ratio | ours train dRSS MB "
        "| original train dRSS MB | page faults/step (ours / orig) |",
        "|" + "---|" * 9,
    ]
    for r in results:
        o, ref, ratio = r["ours"], r["reference"] or {}, r["ratios"] or {}
        goal, speed = GOALS.get(r["preset"]), ratio.get("samples_per_s")
        verdict = "-" if goal is None or speed is None else f">= {goal:g}x: {'met' if speed >= goal else 'NOT met'}"
        lines.append(
            f"| {r['preset']} | {r['batch_size']} x {r['text_len']} x {r['regions']} | {r['optimizer']} "
            f"| {r['malloc']} | {r['steps']} ({r['warmup']}) | {_f(o['samples_per_s'])} "
            f"| {_f(ref.get('samples_per_s'))} | {_f(speed)}x | {verdict} | {_f(o['step_ms'], 0)} "
            f"| {_f(ref.get('step_ms'), 0)} | {o['clean_steps']} / {ref.get('clean_steps', '-')} "
            f"| {o['runs']}; {ref.get('runs', '-')} |"
        )
        memory.append(
            f"| {r['preset']} | {r['optimizer']} | {r['malloc']} | {_f(o['peak_rss_mb'], 0)} "
            f"| {_f(ref.get('peak_rss_mb'), 0)} | {_f(ratio.get('peak_rss_mb'))} | {_f(o['train_rss_delta_mb'], 0)} "
            f"| {_f(ref.get('train_rss_delta_mb'), 0)} "
            f"| {_f(o['page_faults_per_step'], 0)} / {_f(ref.get('page_faults_per_step'), 0)} |"
        )
    lines += ["", *memory]
    lines += [
        "",
        "Numerics (eval mode, identical weights via `export_official_state_dict` loaded strictly into "
        "the original `BertForMultiModalPreTraining`, same batch; gradients of every trained tensor):",
        "",
        "| preset | masked LM loss ours / original | masked region loss ours / original "
        "| alignment loss ours / original | max loss rel diff | max grad rel diff | identical (< 1e-4 / 1e-3) |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in results:
        par = r["parity"]
        if par is None or r["preset"] in seen:
            continue
        seen.add(r["preset"])
        cells = [f"{v['ours']:.6f} / {v['reference']:.6f}" for v in par["losses"].values()]
        lines.append(
            f"| {r['preset']} | {' | '.join(cells)} | {par['max_loss_rel_diff']:.1e} "
            f"| {par['max_grad_rel_diff']:.1e} | {'yes' if par['ok'] else 'NO'} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def update_results(path: Path, section: str) -> None:
    """Replace the section between the markers, or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["demo", "paper-base"])
    p.add_argument("--variants", nargs="+", default=["adamw/default"], help="[PRESET:]OPTIMIZER/MALLOC ...")
    p.add_argument("--batch-size", default="8", help="N or PRESET=N,...")
    p.add_argument("--text-len", type=int, default=36)
    p.add_argument("--regions", type=int, default=37, help="36 boxes + the whole-image token, as the paper")
    p.add_argument("--steps", default="demo=30,paper-base=6", help="timed steps: N or PRESET=N,...")
    p.add_argument("--warmup", default="demo=3,paper-base=2", help="N or PRESET=N,...")
    p.add_argument("--repeats", default="demo=3,paper-base=2", help="N or PRESET=N,...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference-src", default=None, help="checkout of jiasenlu/vilbert_beta (omit: ours only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-quiet-wait", type=float, default=300.0, help="seconds to wait for an idle machine")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    a = p.parse_args(argv)
    batch, steps = per_preset(a.batch_size, a.presets), per_preset(a.steps, a.presets)
    warmup, repeats = per_preset(a.warmup, a.presets), per_preset(a.repeats, a.presets)
    started, results = time.monotonic(), []
    for name in a.presets:
        for opt, malloc in variants_for(a.variants, name):
            print(f"[model_throughput] {name} {opt}/{malloc} ...", file=sys.stderr, flush=True)
            r = benchmark(
                name,
                batch[name],
                a.text_len,
                a.regions,
                steps[name],
                warmup[name],
                a.threads,
                a.reference_src,
                device=a.device,
                repeats=repeats[name],
                optimizer=opt,
                malloc=malloc,
                max_quiet_wait_s=a.max_quiet_wait,
            )
            results.append(r)
            print(
                json.dumps({k: r[k] for k in ("preset", "optimizer", "malloc", "ratios")}), file=sys.stderr, flush=True
            )
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    update_results(a.output, render(results, command, (time.monotonic() - started) / 60))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
