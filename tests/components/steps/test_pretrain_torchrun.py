"""`vilbert pretrain --nproc 2` as a user runs it: torchrun's elastic agent starts two workers; the test SIGKILLs
one worker (from outside, as an OOM killer or a preempted node would) once the first checkpoint exists; the group
restarts, resumes from that checkpoint and finishes, losing at most one checkpoint interval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.components.test_data_world import World, shared_world

STEPS, EVERY = 40, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


def _workers(agent: psutil.Process) -> list[psutil.Process]:
    """The training workers: the agent's spawned children (torch sets their RANK variables in-process, so
    /proc shows no rank; the multiprocessing resource tracker is not a worker)."""
    found = []
    for child in agent.children(recursive=True):
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_killed_worker_restarts_and_the_run_completes(world: World, tmp_path: Path) -> None:
    out = tmp_path / "pretrain"
    cmd = [sys.executable, "-m", "components.cli", "pretrain", "--dataset", str(world.root), "--validation",
           str(world.validation), "--features", str(world.store), "--output", str(out), "--preset", "tiny",
           "--text-init", "none", "--tokenizer", str(world.tokenizer_dir), "--max-steps", str(STEPS),
           "--batch-size", "2", "--checkpoint-every", str(EVERY), "--log-every", "1", "--nproc", "2",
           "--max-restarts", "2", "--max-text-length", "16", "--device", "cpu", "--no-track", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    proc = psutil.Process(agent.pid)
    killed = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and agent.poll() is None:
        if (out / "checkpoints" / f"step-{EVERY:06d}" / "manifest.json").exists():
            workers = _workers(proc)
            if len(workers) == 2:
                victim = max(workers, key=lambda p: p.pid)
                os.kill(victim.pid, signal.SIGKILL)
                killed = victim.pid
                break
        time.sleep(0.05)
    output, _ = agent.communicate(timeout=600)
    assert killed is not None, "no checkpoint appeared before the run ended:\n" + output[-3000:]
    assert agent.returncode == 0, output[-5000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == STEPS and result["world_size"] == 2
    # the restarted group resumed from a checkpoint, so at most EVERY steps were redone
    assert result["resumed_step"] >= EVERY and result["resumed_from"], result
    assert "restart" in output.lower() or "Worker group" in output, output[-3000:]
    assert (out / "final" / "model.safetensors").exists()
