"""Real torchrun (elastic agent, c10d rendezvous, gloo on CPU): a 2-process DDP run of the tiny model, and a
2-process run whose rank 1 SIGKILLs itself mid-training, is restarted by torchrun and resumes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from components.training import checkpointing as ckpt
from components.training.distributed import dist_info_from_env, under_torchrun
from components.training.launch import LaunchError, launch
from components.training.trainer import Trainer, TrainerConfig
from model import ViLBertForTasks, preset
from tests.components.test_trainer import ToyDataset, ToySampler, fixed_collate, vqa_loss

ROOT = Path(__file__).resolve().parents[2]


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def toy_worker(out: str, max_steps: int, checkpoint_every: int, kill_at_call: int = 0) -> dict:
    """One torchrun worker: fine-tunes the tiny tasks model (answer head only, so DDP must find unused
    parameters) on the toy data.  With ``kill_at_call``, rank 1 SIGKILLs itself on that loss call, once (a
    flag file remembers it across the restart).  Loss call 1 is the trainer's unused-parameter probe."""
    torch.set_num_threads(1)
    info = dist_info_from_env()
    torch.manual_seed(0)
    model = ViLBertForTasks(preset("tiny"), num_answers=5)
    flag = Path(out) / "killed-once"
    calls = {"n": 0}

    def maybe_dying_loss(m, batch):
        calls["n"] += 1
        if kill_at_call and info.rank == 1 and calls["n"] == kill_at_call and not flag.exists():
            flag.write_text(f"killed at loss call {calls['n']}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return vqa_loss(m, batch)

    config = TrainerConfig(
        output_dir=Path(out), max_steps=max_steps, batch_size=2, lr=1e-3, checkpoint_every=checkpoint_every,
        log_every=1, progress=False, cpu_threads=1,
    )  # fmt: skip
    trainer = Trainer(config, model, ToyDataset(16), fixed_collate, maybe_dying_loss, sampler=ToySampler(16))
    result = trainer.train().to_dict()
    result["weights_sha256"] = _digest(model)
    result["rank"] = info.rank
    (Path(out) / f"result-rank{info.rank}.json").write_text(json.dumps(result))
    return result


def main(argv: list[str]) -> None:
    """``python -m tests.components.test_launch OUT STEPS EVERY``: as a CLI would, call launch() again:
    inside torchrun it must run here instead of starting more processes."""
    assert under_torchrun()
    out, steps, every = argv
    results = launch(toy_worker, [out, int(steps), int(every)], nproc=2)
    assert list(results) == [dist_info_from_env().rank]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    """launch(module) -> 2 torchrun workers -> 10 DDP steps, checkpoint every 3; each rank's result."""
    out = tmp_path_factory.mktemp("uninterrupted")
    results = launch(
        "tests.components.test_launch", [out, 10, 3], nproc=2, max_restarts=0,
        log_dir=out / "logs", env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert sorted(results) == [0, 1]
    return out, [json.loads((out / f"result-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_process_ddp_run(uninterrupted):
    out, ranks = uninterrupted
    assert all(r["steps"] == 10 and r["world_size"] == 2 and r["resumed_step"] == 0 for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # DDP kept the replicas identical
    assert ranks[0]["final_loss"] == ranks[1]["final_loss"]  # averaged over ranks
    state = ckpt.load_training_state(out / "checkpoints" / "step-000010")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # 16 examples: 8 per rank = 4 steps of 2 per epoch; step 10 = epoch 2, position 4
    assert state["sampler"] == [{"seed": 0, "epoch": 2, "position": 4}] * 2
    assert (out / "final" / "model.safetensors").exists() and not (out / "killed-once").exists()


@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes_exactly(tmp_path, uninterrupted):
    """Rank 1 is SIGKILLed in step 8; torchrun restarts both workers, which resume from step 6 (every 3)
    and end with the same weights as the uninterrupted run."""
    results = launch(toy_worker, [str(tmp_path), 10, 3, 9], nproc=2, max_restarts=2, log_dir=tmp_path / "logs")
    assert (tmp_path / "killed-once").read_text() == "killed at loss call 9\n"
    assert sorted(results) == [0, 1]
    for rank, result in results.items():
        assert result["rank"] == rank and result["steps"] == 10
        assert result["resumed_step"] == 6, "lost more than one checkpoint interval"
        assert result["resumed_from"].endswith("step-000006")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [6, 9, 10]
    _, straight = uninterrupted
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"] == straight[0]["weights_sha256"]
    assert results[0]["final_loss"] == straight[0]["final_loss"]


def test_failure_without_restarts_raises(tmp_path):
    with pytest.raises(LaunchError, match="failed"):
        launch("tests.components.no_such_module", [], nproc=1, max_restarts=0, env={"PYTHONPATH": str(ROOT)})


if __name__ == "__main__":
    main(sys.argv[1:])
