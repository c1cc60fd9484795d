"""Training on this CPU through the real trainer: samples/s and peak RSS (``demo``, ``paper-base``), 1 -> 2
process scaling, and the time a killed worker costs, into the ``training`` section of ``benchmarks/RESULTS.md``.

Everything is the production path: a synthetic world built with the ``vilbert`` CLI (ingest -> validate ->
demo features), ``PretrainingDataset`` + ``Collator`` + ``ResumableDistributedSampler``, ``Trainer`` with its
defaults (fused AdamW where supported, clipping, warm-up schedule, checkpoints), ``launch`` (torchrun's elastic
agent) for more than one process.  Each configuration runs in a fresh process tree; a thread here samples the
tree's RSS and the CPU that other jobs use.  Workers write one JSON event per loss call, so step times come from
the training loop itself (data loading, forward, backward, clipping, optimizer step all included).

    .venv/bin/python benchmarks/training.py --nice -15 --json runs.json  # all runs: ~7 minutes on 2 cores
    .venv/bin/python benchmarks/training.py --runs demo-1p               # one of them (RESULTS.md untouched)
    .venv/bin/python benchmarks/training.py --from-json runs.json        # rewrite the section only

On a machine shared with other sessions' long jobs, ``--nice -15`` (root) raises this session's scheduling group
(see :func:`session_nice`); without it, each run waits for quiet moments (:class:`QuietGate`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
NAME = "training"
WORLD_URI = "synthetic://shapes?seed=0&n=300&size=96"
PAPER_BOXES = 36  # regions per image in the random paper-size store (+ the whole-image token = 37)
SCALING_REPEATS = 3  # 1 x 2 and 2 x 1 runs, alternating
DISTURBED = 0.15  # a step during which other processes used this share of all CPUs (0.3 of 2 cores) is disturbed


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def usage(root: psutil.Process, seen: dict[int, float]) -> tuple[float, float, float, int]:
    """(time, CPU seconds of the whole machine, CPU seconds of ``root``'s tree, its RSS bytes).  ``seen`` keeps
    each process's last CPU time, so processes that exit (a killed worker) still count."""
    rss = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            t, m = p.cpu_times(), p.memory_info()
            seen[p.pid], rss = t.user + t.system, rss + m.rss
        except psutil.Error:
            pass
    m = psutil.cpu_times()
    busy = m.user + m.nice + m.system + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)
    return time.time(), busy, sum(seen.values()), rss


def other_share(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Share of all CPUs that processes outside the tree used between two :func:`usage` samples."""
    return max((b[1] - a[1]) - (b[2] - a[2]), 0.0) / (max(b[0] - a[0], 1e-6) * (psutil.cpu_count() or 1))


@dataclass
class RunSpec:
    """One measured configuration (travels to the child process as JSON)."""

    name: str
    """Row label."""
    preset: str
    """Model preset."""
    store: str
    """Feature store folder."""
    validation: str
    """Validation output folder (``captions.valid.parquet``)."""
    out: str = ""
    """Run folder (events, trainer output); set by the orchestrator."""
    nproc: int = 0
    """0: the trainer in the child process itself; >= 1: ``launch(nproc=...)`` (torchrun agent + workers)."""
    threads: int = 2
    """torch intra-op threads per process."""
    batch_size: int = 8
    """Examples per step and rank."""
    warmup: int = 5
    """Steps excluded from the throughput."""
    timed: int = 40
    """Timed steps (max_steps = warmup + timed + 1: the last step's end is the next loss call)."""
    windows: int = 4
    """The timed steps are cut into this many windows; the median window is reported."""
    checkpoint_every: int = 10_000
    """Trainer checkpoint interval (throughput runs: only the final checkpoint)."""
    kill_step: int = 0
    """> 0: rank ``kill_rank`` SIGKILLs itself when step ``kill_step`` starts (first start only)."""
    kill_rank: int = 1
    """Which rank dies."""
    max_restarts: int = 0
    """torchrun restarts allowed."""
    malloc: str = "default"
    """``components.training.malloc.MALLOC`` setting applied in each worker."""
    tokenizer: str = "minilm"
    """Tokenizer folder, or ``minilm`` (the bundled one)."""
    text_init: bool = True
    """Start the text stream from MiniLM (``demo`` only; other presets start from random weights)."""
    pause_budget_s: float = 30.0
    """Most seconds each run may pause between steps for other jobs to finish (:class:`QuietGate`)."""

    @property
    def max_steps(self) -> int:
        return self.warmup + self.timed + 1

    @property
    def world_size(self) -> int:
        return max(self.nproc, 1)


# ---- the world -----------------------------------------------------------------------------------------------
def ensure_world(work: Path) -> dict[str, Any]:
    """Ingest, validate and extract demo features with the real CLI (reused when already there), and write a
    paper-size store with random features for ``paper-base``.  Returns the paths and the commands."""
    cli = str(Path(sys.executable).with_name("vilbert"))
    data, validation, features, paper = work / "data", work / "validation", work / "features", work / "paper_store"
    commands = [
        [cli, "ingest", "--source", WORLD_URI, "--output", str(data), "--no-progress"],
        [cli, "validate", "--dataset", str(data), "--output", str(validation), "--no-data-docs"],
        [cli, "features", "--dataset", str(data), "--output", str(features), "--backend", "demo"],
    ]
    done = [data / "manifest.parquet", validation / "captions.valid.parquet", features / "index.parquet"]
    for command, marker in zip(commands, done, strict=True):
        if not marker.exists():
            log("running " + shlex.join(command))
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    if not (paper / "index.parquet").exists():
        write_paper_store(validation / "manifest.valid.parquet", paper)
    shown = [shlex.join(["vilbert", *c[1:]]).replace(str(work), "W") for c in commands]
    return {"validation": str(validation), "features": str(features), "paper_store": str(paper), "commands": shown}


def write_paper_store(manifest: Path, store: Path) -> None:
    """Random records at the paper's sizes (36 regions, D = 2048, C = 1601) for every validated image, written
    through the real ``FeatureStoreWriter`` (the demo detector's D = 256 / C = 64 do not fit ``paper-base``)."""
    import numpy as np
    import pyarrow.parquet as pq

    from components.features import FeatureSpec, FeatureStoreWriter, RegionFeatures
    from model import preset

    v = preset("paper-base").vision
    spec = FeatureSpec("benchmark-random", None, v.feature_size, v.target_size, PAPER_BOXES, PAPER_BOXES)
    with FeatureStoreWriter(store, spec) as writer:
        for i, row in enumerate(pq.read_table(manifest).to_pylist()):
            rng = np.random.default_rng(i)
            w, h = row["width"], row["height"]
            xy = rng.random((PAPER_BOXES, 2)) * [w / 2, h / 2]
            wh = rng.random((PAPER_BOXES, 2)) * [w / 2, h / 2]
            logits = 2 * rng.standard_normal((PAPER_BOXES, v.target_size))
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            feats = np.maximum(rng.standard_normal((PAPER_BOXES, v.feature_size)), 0)
            boxes = np.concatenate([xy, xy + wh], 1)
            writer.add(RegionFeatures(row["image_id"], boxes.astype(np.float32), feats, probs, w, h))


# ---- inside a worker -------------------------------------------------------------------------------------------
class EventLog:
    """Appends ``{"t", "gen", "event", ...}`` lines (wall-clock seconds, comparable across processes)."""

    def __init__(self, path: Path, gen: int):
        self.gen = gen
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the worker's lifetime

    def add(self, event: str, sync: bool = False, **data: Any) -> None:
        self.file.write(json.dumps({"t": time.time(), "gen": self.gen, "event": event, **data}) + "\n")
        self.file.flush()
        if sync:  # the process is about to die
            os.fsync(self.file.fileno())


class QuietGate:
    """Keeps other jobs out of the timed steps: at each step's start, the CPU share that other processes used
    during the previous step is measured (machine minus this run's process tree); when it reached
    :data:`DISTURBED` the loop pauses, on every rank, until a quiet second (up to ``budget_s`` of
    pausing per process).  Pauses are not step time; disturbed steps are marked and left out of the windows."""

    def __init__(self, budget_s: float, rank: int, distributed: bool, under_agent: bool):
        self.budget, self.waited, self.rank, self.distributed = budget_s, 0.0, rank, distributed
        self.root = psutil.Process(os.getppid() if under_agent else os.getpid())  # the agent's tree, or this one
        self.seen: dict[int, float] = {}
        self.last = usage(self.root, self.seen)

    def step(self, force: bool = False) -> tuple[float, bool]:
        """(other processes' CPU share during the previous step, whether the loop paused)."""
        import torch
        import torch.distributed as dist

        from components.bench.throughput import wait_until_quiet

        other = other_share(self.last, usage(self.root, self.seen))
        pause = force or (other >= DISTURBED and self.waited < self.budget)
        if self.distributed:  # rank 0 decides for everyone
            flag = torch.tensor([int(pause and self.rank == 0)])
            dist.broadcast(flag, src=0)
            pause = bool(flag.item())
        if pause:
            if self.rank == 0:
                wait = max(min(60.0, self.budget - self.waited), 10.0 if force else 0.0)
                self.waited += wait_until_quiet(wait, DISTURBED)
            if self.distributed:
                dist.barrier()
        self.last = usage(self.root, self.seen)
        return other, pause


def train_worker(spec_json: str) -> dict[str, Any]:
    """Build model, data and trainer exactly as a pretraining run does, and train; events go to the run folder."""
    import logging
    import resource
    import signal

    import torch

    from components.data.collate import Collator, model_inputs
    from components.data.pretraining import PretrainingDataConfig, PretrainingDataset, validated_captions
    from components.data.regions import RegionSource
    from components.data.sampler import ResumableDistributedSampler
    from components.training import Trainer, TrainerConfig
    from components.training.distributed import dist_info_from_env, restart_count, under_torchrun
    from components.training.malloc import tune_malloc
    from model import ViLBertForPretraining, preset
    from model.checkpoint import load_bert_text_stream
    from model.tokenizer import load_tokenizer, minilm_dir

    spec = RunSpec(**json.loads(spec_json))
    info, gen = dist_info_from_env(), restart_count()
    events = EventLog(Path(spec.out) / f"events-rank{info.rank}.jsonl", gen)
    events.add("start", created=psutil.Process().create_time())
    tune_malloc(spec.malloc)
    torch.set_num_threads(spec.threads)

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    class TrainerEvents(logging.Handler):
        """The trainer's own log lines mark finished checkpoints and the resume point."""

        def emit(self, record: logging.LogRecord) -> None:
            message = str(record.msg)
            if message.startswith("checkpoint "):
                events.add("checkpoint")
            elif message.startswith("resumed from"):
                events.add("resumed", step=int(record.args[1]))  # type: ignore[index, arg-type]

    trainer_log = logging.getLogger("components.training.trainer")
    trainer_log.setLevel(logging.INFO)
    trainer_log.addHandler(TrainerEvents())

    tok_dir = minilm_dir() if spec.tokenizer == "minilm" else Path(spec.tokenizer)
    tokenizer, config = load_tokenizer(tok_dir), preset(spec.preset)
    torch.manual_seed(0)
    model = ViLBertForPretraining(config)
    if spec.text_init and spec.preset == "demo":
        load_bert_text_stream(model, minilm_dir())
    regions = RegionSource(spec.store, config)
    dataset = PretrainingDataset(validated_captions(spec.validation), regions, tokenizer, PretrainingDataConfig())
    sampler = ResumableDistributedSampler(dataset, seed=0)
    probe = int(info.distributed)  # the trainer's unused-parameter probe is loss call 1 (find_unused_parameters=None)
    gate = QuietGate(spec.pause_budget_s if gen == 0 else 0.0, info.rank, info.distributed, under_torchrun())
    calls = 0

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal calls
        calls += 1
        arrive = time.time()
        dying = bool(spec.kill_step) and gen == 0 and calls == spec.kill_step + probe
        other, paused = gate.step(force=dying and spec.pause_budget_s > 0)  # the kill comes at a quiet moment
        mask, regs = batch["attention_mask"], batch["region_mask"]
        events.add("loss", n=calls, arrive=arrive, other_prev=other, paused=paused, rss_peak_mb=peak_mb(),
                   T=mask.shape[1], R=regs.shape[1], tokens=int(mask.sum()), regions=int(regs.sum()))  # fmt: skip
        if dying and info.rank == spec.kill_rank:
            events.add("kill", sync=True, step=spec.kill_step)
            os.kill(os.getpid(), signal.SIGKILL)
        out = m(**model_inputs(batch))
        return out.loss, {"masked_lm": out.masked_lm_loss.item(), "alignment": out.alignment_loss.item()}

    trainer_config = TrainerConfig(
        output_dir=Path(spec.out) / "train", max_steps=spec.max_steps, batch_size=spec.batch_size,
        checkpoint_every=spec.checkpoint_every, log_every=spec.max_steps, progress=False, cpu_threads=spec.threads,
    )  # fmt: skip
    trainer = Trainer(
        trainer_config, model, dataset, Collator(pad_token_id=tokenizer.pad_token_id), loss_fn, sampler=sampler,
        tokenizer=tokenizer, feature_spec=regions.spec.to_dict(), feature_spec_hash=regions.spec.sha256(),
    )  # fmt: skip
    events.add("ready", rss_peak_mb=peak_mb())
    result = trainer.train().to_dict()
    events.add("end", result=result, rss_peak_mb=peak_mb())
    return result


def child_main(spec_json: str) -> None:
    """The measured process: the trainer itself (nproc 0) or torchrun's agent with ``nproc`` workers."""
    spec = RunSpec(**json.loads(spec_json))
    if spec.nproc == 0:
        train_worker(spec_json)
        return
    from components.training import launch

    launch(train_worker, [spec_json], nproc=spec.nproc, max_restarts=spec.max_restarts,
           threads_per_proc=spec.threads, log_dir=Path(spec.out) / "logs")  # fmt: skip


# ---- the orchestrator ------------------------------------------------------------------------------------------
@dataclass
class TreeMonitor:
    """Samples (time, machine busy CPU s, the tree's CPU s, the tree's RSS bytes) of a process and its children."""

    pid: int
    interval: float = 0.25
    samples: list[tuple[float, float, float, int]] = field(default_factory=list)
    """:func:`usage` samples."""

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        root, seen = psutil.Process(self.pid), dict[int, float]()
        while not self._stop.is_set():
            self.samples.append(usage(root, seen))
            self._stop.wait(self.interval)

    def other_load(self, t0: float, t1: float) -> float:
        """Share of all CPUs used by other processes between t0 and t1."""
        before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
        return other_share(before[-1], after[0]) if after[0][0] > before[-1][0] else float("nan")

    def peak_rss_mb(self) -> float:
        return max((s[3] for s in self.samples), default=0) / 2**20


def run_child(spec: RunSpec, work: Path, quiet_wait: float) -> dict[str, Any]:
    """Run ``spec`` in a fresh process tree; returns its events per rank and what the monitor saw."""
    from components.bench.throughput import wait_until_quiet

    out = work / "runs" / spec.name
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    spec.out = str(out)
    waited = wait_until_quiet(quiet_wait, DISTURBED) if quiet_wait > 0 else 0.0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(asdict(spec))], env=env)
    monitor = TreeMonitor(proc.pid)
    monitor.start()
    rc = proc.wait()
    monitor.stop()
    if rc != 0:
        raise RuntimeError(f"run {spec.name} failed with exit status {rc}; see {out}")
    events: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("events-rank*.jsonl")):
        rank = int(path.stem.removeprefix("events-rank"))
        events[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    subprocess.run(["rm", "-rf", str(out / "train")], check=True)  # checkpoints: gigabytes for paper-base
    return {"spec": spec, "events": events, "monitor": monitor, "wall_s": time.time() - started, "waited_s": waited}


def step_events(events: list[dict[str, Any]], gen: int, probe: bool) -> dict[int, dict[str, Any]]:
    """Step number -> its loss-call event, for one rank and generation (the probe call left out)."""
    mine = [e for e in events if e["gen"] == gen]
    resumed = next((e["step"] for e in mine if e["event"] == "resumed"), 0)
    return {resumed + e["n"] - probe: e for e in mine if e["event"] == "loss" and e["n"] > probe}


def step_times(steps: dict[int, dict[str, Any]], first: int, last: int, skip_every: int) -> list[dict[str, Any]]:
    """Steps first..last that have a successor: start (after any pause), seconds (to the next step's arrival,
    so pauses are excluded), other jobs' CPU share meanwhile.  Steps ending in a checkpoint are left out."""
    out = []
    for s in range(first, last + 1):
        if s in steps and s + 1 in steps and s % skip_every:
            a, b = steps[s], steps[s + 1]
            out.append({"step": s, "start": a["t"], "seconds": b["arrive"] - a["t"], "other": b["other_prev"]})
    return out


def split_windows(steps: list[Any], n: int) -> list[list[Any]]:
    """``steps`` cut into min(n, len(steps)) consecutive windows whose sizes differ by at most one; every step
    lands in exactly one window (a remainder is spread, never dropped nor made an extra window)."""
    n = min(n, len(steps))
    return [steps[w * len(steps) // n : (w + 1) * len(steps) // n] for w in range(n)]


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    """Throughput over windows of undisturbed steady-state steps (gen 0, rank 0), batch shapes and memory."""
    spec, monitor, ev = run["spec"], run["monitor"], run["events"]
    steps = step_events(ev[0], 0, spec.nproc >= 2)
    last = (spec.kill_step - 1) if spec.kill_step else spec.max_steps - 1
    timed = step_times(steps, spec.warmup + 1, last, spec.checkpoint_every)
    clean = [s for s in timed if s["other"] < DISTURBED]
    clean = clean if len(clean) >= len(timed) / 2 else timed  # too few undisturbed steps: all, as they came
    per_step, windows = spec.batch_size * spec.world_size, []
    for chunk in split_windows(clean, spec.windows):
        seconds = sum(c["seconds"] for c in chunk)
        windows.append({"samples_per_s": per_step * len(chunk) / seconds, "steps": len(chunk),
                        "other_load": max(c["other"] for c in chunk)})  # fmt: skip
    losses = [e for e in ev[0] if e["event"] == "loss" and e["gen"] == 0]
    ends = [e for rank in ev.values() for e in rank if e["event"] == "end"]
    final_ckpt = [e["t"] for e in ev[0] if e["event"] == "checkpoint" and e["gen"] == 0]
    return {
        "name": spec.name, "preset": spec.preset, "nproc": spec.nproc, "threads": spec.threads,
        "batch_size": spec.batch_size, "malloc": spec.malloc, "warmup": spec.warmup, "steps_timed": len(timed),
        "steps_clean": sum(s["other"] < DISTURBED for s in timed), "steps_used": len(clean),
        "other_load_median": statistics.median(s["other"] for s in timed),
        "paused_s": sum(e["t"] - e["arrive"] for e in losses),
        "samples_per_s": statistics.median(w["samples_per_s"] for w in windows),
        "windows": windows, "step_s_median": statistics.median(s["seconds"] for s in clean),
        "mean_T": statistics.mean(e["T"] for e in losses), "mean_R": statistics.mean(e["R"] for e in losses),
        "mean_tokens": statistics.mean(e["tokens"] for e in losses) / spec.batch_size,
        "mean_regions": statistics.mean(e["regions"] for e in losses) / spec.batch_size,
        "rss_train_peak_mb": max(e["rss_peak_mb"] for r in ev.values() for e in r if e["event"] == "loss"),
        "rss_end_peak_mb": max((e["rss_peak_mb"] for e in ends), default=None),
        "tree_rss_peak_mb": monitor.peak_rss_mb(), "wall_s": run["wall_s"], "waited_s": run["waited_s"],
        "trainer_samples_per_s": ends[0]["result"]["samples_per_s"] if ends and not spec.kill_step else None,
        "final_checkpoint_s": final_ckpt[-1] - steps[spec.max_steps]["t"] if final_ckpt and not spec.kill_step
        else None,
    }  # fmt: skip


def analyse_failure(run: dict[str, Any]) -> dict[str, Any]:
    """Kill -> the same step reached again, against the checkpoint interval (times from rank 0's events, except
    the kill, which the dying rank logs)."""
    spec, ev, monitor = run["spec"], run["events"], run["monitor"]
    k, kill_step = spec.checkpoint_every, spec.kill_step
    kill_t = next(e["t"] for e in ev[spec.kill_rank] if e["event"] == "kill")
    gen0, gen1 = step_events(ev[0], 0, True), step_events(ev[0], 1, True)
    after = [e for e in ev[0] if e["gen"] == 1]
    created = min(e["created"] for r in ev.values() for e in r if e["event"] == "start" and e["gen"] == 1)
    entered = next(e["t"] for e in after if e["event"] == "start")
    ready = next(e["t"] for e in after if e["event"] == "ready")
    probe_t = next(e["arrive"] for e in after if e["event"] == "loss")
    back = gen1[kill_step]["arrive"]
    resumed = next(e["step"] for e in after if e["event"] == "resumed")
    steady = step_times(gen0, 3, kill_step - 1, k)
    step_s = statistics.median(s["seconds"] for s in ([s for s in steady if s["other"] < DISTURBED] or steady))
    # one interval before the kill: steps k+1 .. 2k and the checkpoint written after step 2k (pauses excluded)
    interval = sum(s["seconds"] for s in step_times(gen0, k + 1, 2 * k, 10**9))
    with_ckpt = gen0[k + 1]["arrive"] - gen0[k]["t"]
    lost = back - kill_t
    return {
        "checkpoint_every": k, "kill_step": kill_step, "resumed_step": resumed, "steps_redone": kill_step - 1 - resumed,
        "step_s": step_s, "interval_compute_s": k * step_s, "interval_wall_s": interval,
        "lost_s": lost, "lost_over_interval": lost / interval, "lost_over_interval_compute": lost / (k * step_s),
        "detect_restart_s": created - kill_t, "imports_s": entered - created, "build_s": ready - entered,
        "resume_s": probe_t - ready, "redo_s": back - probe_t, "checkpoint_write_s": with_ckpt - step_s,
        "other_load_recovery": monitor.other_load(kill_t, back), "wall_s": run["wall_s"],
    }  # fmt: skip


# ---- report ----------------------------------------------------------------------------------------------------
def default_runs(world: dict[str, Any]) -> list[RunSpec]:
    demo = {"preset": "demo", "store": world["features"], "validation": world["validation"]}
    paper = {"preset": "paper-base", "store": world["paper_store"], "validation": world["validation"]}
    return [
        RunSpec("demo-1p", **demo),
        RunSpec("paper-base-1p", **paper, warmup=2, timed=12, windows=3, pause_budget_s=60.0),
        RunSpec("paper-base-1p-tuned", **paper, warmup=2, timed=12, windows=3, pause_budget_s=60.0, malloc="tuned"),
        *(
            RunSpec(f"demo-launch-{n}x{t}-{i}", **demo, nproc=n, threads=t, warmup=4, timed=30, windows=3)
            for i in range(1, SCALING_REPEATS + 1)
            for n, t in ((1, 2), (2, 1))
        ),  # alternating: drift hits both
        RunSpec(
            "demo-failure-2x1",
            **demo,
            nproc=2,
            threads=1,
            warmup=2,
            timed=27,
            windows=1,
            checkpoint_every=10,
            kill_step=26,
            max_restarts=1,
        ),  # fmt: skip
    ]


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _row(r: dict[str, Any]) -> str:
    how = "trainer in-process" if r["nproc"] == 0 else f"launch(nproc={r['nproc']})"
    windows = ", ".join(_f(w["samples_per_s"], 2) for w in r["windows"])
    return (
        f"| {r['name']} | {r['preset']} | {how}, {max(r['nproc'], 1)} x {r['threads']} | {r['batch_size']} "
        f"| {r['mean_T']:.1f} x {r['mean_R']:.1f} ({r['mean_tokens']:.1f}, {r['mean_regions']:.1f}) "
        f"| **{r['samples_per_s']:.2f}** | {windows} | {r['steps_clean']} / {r['steps_timed']} ({r['warmup']}), "
        f"{r['steps_used']}; "
        f"{100 * r['other_load_median']:.0f}% "
        f"| {r['paused_s']:.0f} | {1000 * r['step_s_median']:.0f} "
        f"| {r['rss_train_peak_mb']:.0f} / {_f(r['rss_end_peak_mb'], 0)} | {r['tree_rss_peak_mb']:.0f} "
        f"| {_f(r['final_checkpoint_s'])} |"
    )


def render(data: dict[str, Any], notes: str) -> str:
    """The section from what :func:`main` measured (``data``: date, minutes, command, nice, world, rows, failure)."""
    import torch

    world, rows, failure, nice = data["world"], data["rows"], data["failure"], data["nice"]

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    lines = [
        f"<!-- {NAME}:start -->",
        "## Training through the real trainer on this CPU: samples/s, peak RSS, 1 -> 2 processes, a killed worker",
        "",
        f"- Date: {data['date']}; total benchmark time {data['minutes']:.1f} min; "
        f"machine: `nproc` = {os.cpu_count()}, {cpu}, Python {platform.python_version()}, torch {torch.__version__}. "
        "The machine is shared with other engineers' jobs. A `QuietGate` in the loop measures, at every step's "
        "start, the CPU share other processes used during the previous step (machine minus this run's process "
        f"tree); a step with >= {100 * DISTURBED:.0f}% of all CPUs is *disturbed* and left out of the windows "
        "(unless fewer than half the steps are undisturbed: then all are used, see the steps columns)."
        + (
            f" This session's scheduling group (kernel autogroup) ran at **nice {nice}** while measuring: other "
            "engineers' long training jobs held both cores for the whole session, the kernel shares the CPUs "
            "fairly between sessions (a process's own nice value only counts inside its session), and 2 torch "
            "threads that share a core with one foreign busy thread run many times slower (see the analysis). "
            "The other jobs still got a few % (column below) and slowed down while this ran."
            if nice
            else " Each run first waits for a quiet second, and after a disturbed step the loop pauses (all ranks: "
            "a broadcast + barrier) until a quiet second, up to a budget per run; pauses are not step time."
        ),
        f"- Command: `{data['command']}`",
        "- World (W = the work folder): " + "; ".join(f"`{c}`" for c in world["commands"]) + ". Pretraining reads "
        "the 240 validated `train` captions (`PretrainingDataset` -> `Collator` (pads to the batch's longest) -> "
        "`ResumableDistributedSampler`). `demo` uses the demo detector's store (D = 256, C = 64, 10 regions + the "
        "whole-image token); `paper-base` (D = 2048, C = 1601) cannot use it, so it reads a store of **random** "
        f"features at the paper's sizes ({PAPER_BOXES} regions + the whole-image token) written through "
        "`FeatureStoreWriter` for the same images: a sizes-only stand-in, not a detector's output.",
        "- Model and trainer: `ViLBertForPretraining(preset(...))`; `demo`'s text stream from MiniLM "
        "(`load_bert_text_stream`), `paper-base` from random weights (no bert-base weights offline: same cost). "
        "`Trainer` defaults: AdamW with `fused=None` (= fused, which torch supports on CPU), weight decay 0.01, "
        "clipping at 1.0, linear warm-up/decay, fp32 (the trainer never autocasts on CPU), DataLoader "
        "`num_workers=0`, train mode (dropout on), glibc malloc untouched, except in `-tuned` rows: "
        '`components.training.malloc.tune_malloc("tuned")` in the worker (no trimming, fixed 32 MiB mmap threshold, 256 MiB '
        "top pad; the trainer does not do this itself); `log_every` = the last step, checkpoints only where "
        "stated.",
        "- Step time = wall time between consecutive calls of the loss function on rank 0: one whole loop "
        "iteration (batch loading and collation, forward, backward with DDP's all-reduce, clipping, AdamW, "
        "scheduler). Warm-up steps are excluded; the undisturbed timed steps are cut into windows and the "
        "**median window** is reported (all windows listed). Peak RSS per process = `ru_maxrss` of each process "
        "(max over ranks), at the last timed step / after the final checkpoint write; tree = sum of RSS over the "
        "measured process and its children (torchrun agent + workers), sampled every 0.25 s.",
        "",
        "| run | preset | how, processes x threads | batch / rank | padded T x R per batch (real tokens, regions "
        "per example) | samples/s | windows samples/s | undisturbed / timed steps (warm-up), used; other jobs' CPU "
        "share, median step | paused s "
        "| step ms (median) | peak RSS per process MB (training / + final checkpoint) | tree peak RSS MB "
        "| final checkpoint write s |",
        "|" + "---|" * 13,
        *(_row(r) for r in rows.values()),
    ]
    pairs = [(rows[f"demo-launch-1x2-{i}"], rows[f"demo-launch-2x1-{i}"]) for i in range(1, SCALING_REPEATS + 1)
             if f"demo-launch-1x2-{i}" in rows and f"demo-launch-2x1-{i}" in rows]  # fmt: skip
    if pairs:
        ratios = [two["samples_per_s"] / one["samples_per_s"] for one, two in pairs]
        lines += [
            "",
            "1 -> 2 processes (`demo`, batch 8 per rank, gloo DDP through `launch`, the same 2 cores in both: 1 "
            f"process x 2 threads, then 2 x 1, {len(pairs)} times alternating); **median ratio "
            f"{statistics.median(ratios):.2f}**:",
            "",
            "| repeat | 1 x 2 samples/s | 2 x 1 samples/s | ratio | step ms (1 x 2 / 2 x 1) "
            "| tree peak RSS MB (1 x 2 / 2 x 1) |",
            "|---|---|---|---|---|---|",
            *(
                f"| {i} | {one['samples_per_s']:.2f} | {two['samples_per_s']:.2f} | {ratio:.2f} "
                f"| {1000 * one['step_s_median']:.0f} / {1000 * two['step_s_median']:.0f} "
                f"| {one['tree_rss_peak_mb']:.0f} / {two['tree_rss_peak_mb']:.0f} |"
                for i, ((one, two), ratio) in enumerate(zip(pairs, ratios, strict=True), 1)
            ),
        ]
    if failure:
        f = failure
        lines += [
            "",
            f"A killed worker (`demo`, 2 x 1, `launch(max_restarts=1)`, checkpoint every {f['checkpoint_every']} "
            f"steps): rank 1 SIGKILLs itself as step {f['kill_step']} starts; torchrun restarts both workers, which "
            "resume from the newest checkpoint. Time lost = from the kill to the moment the restarted run starts "
            f"step {f['kill_step']} again. Interval = the wall time of one checkpoint interval before the kill "
            f"({f['checkpoint_every']} steps + one checkpoint write); compute-only = {f['checkpoint_every']} x the "
            "median step. The recovery is not gated (other jobs' CPU share during it in the last column).",
            "",
            "| resumed from step | steps redone | median step s | interval s (compute-only) | time lost s "
            "| lost / interval (compute-only) | kill -> new workers s | interpreter + imports s | model + data s "
            "| process group + resume + probe s | redone steps s | checkpoint write s | other jobs' CPU % |",
            "|" + "---|" * 13,
            f"| {f['resumed_step']} | {f['steps_redone']} | {f['step_s']:.3f} | {f['interval_wall_s']:.1f} "
            f"({f['interval_compute_s']:.1f}) | {f['lost_s']:.1f} | **{f['lost_over_interval']:.2f}** "
            f"({f['lost_over_interval_compute']:.2f}) | {f['detect_restart_s']:.1f} | {f['imports_s']:.1f} "
            f"| {f['build_s']:.1f} | {f['resume_s']:.1f} | {f['redo_s']:.1f} | {f['checkpoint_write_s']:.1f} "
            f"| {100 * f['other_load_recovery']:.0f} |",
        ]
    lines += [
        "",
        f"<!-- {NAME}:notes:start -->",
        notes.strip(),
        f"<!-- {NAME}:notes:end -->",
        "",
        f"<!-- {NAME}:end -->",
    ]
    return "\n".join(lines)


def kept_notes(results: Path) -> str:
    """The hand-written analysis of the previous section, kept across re-runs (it must be re-read by a person)."""
    start, end = f"<!-- {NAME}:notes:start -->", f"<!-- {NAME}:notes:end -->"
    text = results.read_text() if results.exists() else ""
    if start in text and end in text:
        return text.split(start, 1)[1].split(end, 1)[0]
    return "### Training benchmark: analysis\n\n(not written yet)"


@contextlib.contextmanager
def session_nice(nice: int) -> Iterator[None]:
    """With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) CPU time is shared
    fairly between sessions and a process's own nice value only counts inside its session; so the nice value
    is set on this session's group (``/proc/self/autogroup``; < 0 needs root) and restored afterwards."""
    path = Path("/proc/self/autogroup")
    if not nice:
        yield
        return
    before = int(path.read_text().split()[-1]) if path.exists() else None
    os.setpriority(os.PRIO_PROCESS, 0, nice)  # inside the session too
    if before is not None:
        path.write_text(str(nice))
    try:
        yield
    finally:
        if before is not None:
            path.write_text(str(before))


def measure_all(a: argparse.Namespace, world: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict | None]:
    """Each selected run in its own process tree, analysed."""
    specs = [s for s in default_runs(world) if not a.runs or s.name in a.runs]
    rows: dict[str, dict[str, Any]] = {}
    failure = None
    for spec in specs:
        log(f"{spec.name}: {spec.preset}, nproc {spec.nproc}, {spec.threads} threads, batch {spec.batch_size}")
        if a.nice < 0:  # others' jobs run only while we are idle: waiting for them to stop is pointless
            spec.pause_budget_s, a.quiet_wait = 0.0, 0.0
        run = run_child(spec, a.work, a.quiet_wait)
        rows[spec.name] = analyse(run)
        if spec.kill_step:
            failure = analyse_failure(run)
            log(f"{spec.name}: {json.dumps(failure)}")
        r = rows[spec.name]
        log(
            f"{spec.name}: {r['samples_per_s']:.2f} samples/s, RSS {r['rss_train_peak_mb']:.0f} MB, {r['wall_s']:.0f} s"
        )
    return rows, failure


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/vilbert-bench-training"), help="world + runs folder")
    p.add_argument("--runs", nargs="+", help="run only these (by name); RESULTS.md is then left alone")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="max seconds to wait for a quiet machine per run")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--json", type=Path, help="also write the analysed runs here")
    p.add_argument("--nice", type=int, default=0, help="nice value of this session's scheduling group while measuring")
    p.add_argument("--from-json", type=Path, help="measure nothing: rewrite the section from a --json file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child_main(a.child)
        return
    if a.from_json:
        data = json.loads(a.from_json.read_text())
    else:
        started = time.monotonic()
        data = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "nice": a.nice,
        }
        with session_nice(a.nice):
            data["world"] = ensure_world(a.work)
            data["rows"], data["failure"] = measure_all(a, data["world"])
        data["minutes"] = (time.monotonic() - started) / 60
        if a.json:
            a.json.write_text(json.dumps(data, indent=2))
        if a.runs:
            return
    from _results import update_section  # benchmarks/ is on sys.path when run as a script

    section = render(data, kept_notes(a.results))
    update_section(a.results, section, NAME)
    print(section)


if __name__ == "__main__":
    main()
