"""Trainer: exact resume, checkpoint verification and fallback, retention, lineage checks, final export.

The toy dataset, collate function and sampler below follow the trainer's protocols without using
components.data, so these tests do not depend on the real data pipeline.  The launch tests reuse them.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components.data.sampler import ResumableDistributedSampler
from components.training import checkpointing as ckpt
from components.training.config import TrainerConfig, TrainerConfigError
from components.training.optim import WarmupLinearDecay, build_adamw
from components.training.trainer import HISTORY, Trainer, loss_series
from model import ViLBertForPretraining, ViLBertForTasks, preset
from model.checkpoint import load_checkpoint, read_feature_spec

TOKENS, REGIONS = 8, 5


class ToyDataset(torch.utils.data.Dataset):
    """``n`` fixed ViLBERT examples; example i depends only on i."""

    def __init__(self, n: int = 24, config=None):
        self.n, self.config = n, config or preset("tiny")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        if isinstance(i, tuple):  # the real sampler yields (epoch, index) pairs
            i = i[1]
        g = torch.Generator().manual_seed(1000 + i)
        t, v = self.config.text, self.config.vision
        ids = torch.randint(5, t.vocab_size, (TOKENS,), generator=g)
        ids[0] = 1
        xy = torch.rand(REGIONS, 2, generator=g) * 0.5
        wh = torch.rand(REGIONS, 2, generator=g) * 0.4 + 0.05
        boxes = torch.cat([xy, xy + wh, wh[:, :1] * wh[:, 1:]], -1)
        boxes[0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
        return {
            "index": i,
            "input_ids": ids,
            "features": torch.rand(REGIONS, v.feature_size, generator=g),
            "boxes": boxes,
            "region_targets": torch.softmax(torch.randn(REGIONS, v.target_size, generator=g), -1),
            "answer": i % 5,
        }


def _stack(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "features", "boxes", "region_targets")}


def random_collate(items: list[dict]) -> dict:
    """Masks with the GLOBAL torch RNG, as a naive collator would: exact resume must restore that stream."""
    batch = _stack(items)
    b = len(items)
    lm = torch.full((b, TOKENS), -1, dtype=torch.long)
    pos = torch.randint(1, TOKENS, (b,))
    lm[torch.arange(b), pos] = batch["input_ids"][torch.arange(b), pos]
    regions = torch.full((b, REGIONS), -1, dtype=torch.long)
    regions[torch.arange(b), torch.randint(1, REGIONS, (b,))] = 1
    batch.update(masked_lm_labels=lm, region_labels=regions, alignment_labels=torch.randint(0, 2, (b,)))
    return batch


def fixed_collate(items: list[dict]) -> dict:
    """Randomness derived from the examples only: what exact resume needs with DataLoader workers."""
    batch = _stack(items)
    idx = torch.tensor([it["index"] for it in items])
    lm = torch.full((len(items), TOKENS), -1, dtype=torch.long)
    pos = 1 + idx % (TOKENS - 1)
    lm[torch.arange(len(items)), pos] = batch["input_ids"][torch.arange(len(items)), pos]
    regions = torch.full((len(items), REGIONS), -1, dtype=torch.long)
    regions[torch.arange(len(items)), 1 + idx % (REGIONS - 1)] = 1
    batch.update(masked_lm_labels=lm, region_labels=regions, alignment_labels=idx % 2)
    batch["answers"] = torch.tensor([it["answer"] for it in items])
    return batch


class ToySampler:
    """Per (seed, epoch) shuffle, split over RANK / WORLD_SIZE, resumable mid-epoch: the trainer's sampler
    protocol (the API of components.data.sampler.ResumableDistributedSampler), written independently."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.epoch, self.position = 0, 0

    def samples_per_epoch(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)).tolist()
        perm += perm[: self.samples_per_epoch() * self.world - self.n]  # pad so every rank gets as many
        return iter(perm[self.rank :: self.world][self.position :])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self, index: int | None = None) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position if index is None else index}

    def load_state_dict(self, state: dict) -> None:
        assert state["seed"] == self.seed, state
        self.epoch, self.position = state["epoch"], state["position"]


def pretraining_loss(model, batch):
    out = model(
        input_ids=batch["input_ids"],
        features=batch["features"],
        boxes=batch["boxes"],
        masked_lm_labels=batch["masked_lm_labels"],
        region_labels=batch["region_labels"],
        region_targets=batch["region_targets"],
        alignment_labels=batch["alignment_labels"],
    )
    return out.loss, {"masked_lm": out.masked_lm_loss.item(), "alignment": out.alignment_loss.item()}


def vqa_loss(model, batch):
    """Uses only the answer head of ViLBertForTasks: every other head's parameters get no gradient."""
    out = model(input_ids=batch["input_ids"], features=batch["features"], boxes=batch["boxes"], heads=("answer",))
    loss = torch.nn.functional.cross_entropy(out.answer_logits, batch["answers"])
    return loss, {}


class Crash(RuntimeError):
    pass


def crashing(loss_fn, after_calls: int):
    """loss_fn that raises on call number ``after_calls + 1``: a run killed in the middle of a step."""
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Crash(f"simulated crash at call {calls['n']}")
        return loss_fn(model, batch)

    return wrapped


def make_trainer(
    out: Path, *, n=24, seed=0, loss_fn=pretraining_loss, collate=random_collate, model=None, sampler=None, **overrides
):
    torch.manual_seed(seed)
    settings = dict(
        output_dir=out, max_steps=6, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=1,
        warmup_steps=2, progress=False, cpu_threads=1, seed=seed,
    )  # fmt: skip
    settings.update(overrides)
    trainer_kwargs = {
        k: settings.pop(k)
        for k in ("eval_fn", "tracker", "data_hash", "feature_spec_hash", "feature_spec")
        if k in settings
    }
    model = model or ViLBertForPretraining(preset("tiny"))
    return Trainer(
        TrainerConfig(**settings),
        model,
        ToyDataset(n),
        collate,
        loss_fn,
        sampler=(sampler or ToySampler)(n, seed=seed),
        **trainer_kwargs,
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((x - wb[k]).abs().max().item() for k, x in wa.items())
    assert worst == 0.0, f"weights differ by up to {worst}"


# ---- tests ------------------------------------------------------------------------------------------
def test_config_is_validated(tmp_path):
    with pytest.raises(TrainerConfigError, match="max_steps and/or epochs"):
        TrainerConfig(output_dir=tmp_path)
    with pytest.raises(TrainerConfigError) as err:
        TrainerConfig(output_dir=tmp_path, max_steps=0, batch_size=0, lr=-1, device="tpu")
    assert all(s in str(err.value) for s in ("max_steps", "batch_size", "lr", "device"))
    cfg = TrainerConfig(output_dir=str(tmp_path), epochs=1.5)
    assert isinstance(cfg.output_dir, Path) and TrainerConfig.from_dict(cfg.to_dict()) == cfg


def test_lr_multipliers_give_a_prefix_its_own_rate(tmp_path):
    """The fine-tuning heads' larger rate: every parameter under a prefix at lr x factor, the rest at lr, the
    weight-decay split kept in both, and the schedule scaling both groups alike."""
    model = ViLBertForTasks(preset("tiny"), num_answers=5)
    optimizer = build_adamw(model, 1e-4, 0.01, multipliers=(("answer.", 30.0),), fused=False)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        lr, decay = rate[id(param)]
        assert lr == pytest.approx(3e-3 if name.startswith("answer.") else 1e-4), name
        assert decay == (0.01 if param.ndim >= 2 else 0.0), name
    assert len(rate) == sum(1 for _ in model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(warmup=0, total=4))
    optimizer.step()
    scheduler.step()
    assert sorted({round(g["lr"], 9) for g in optimizer.param_groups}) == [7.5e-5, 2.25e-3]
    cfg = TrainerConfig(output_dir=tmp_path, max_steps=1, lr_multipliers=[["answer.", 30]])
    assert cfg.lr_multipliers == (("answer.", 30.0),) and TrainerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TrainerConfigError, match="lr_multipliers"):
        TrainerConfig(output_dir=tmp_path, max_steps=1, lr_multipliers=(("answer.", 0.0),))


def test_warmup_then_linear_decay():
    f = WarmupLinearDecay(warmup=2, total=6)
    assert [round(f(s), 3) for s in range(7)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize(
    "variant",
    [
        dict(collate=random_collate, grad_accum=1, num_workers=0),
        dict(collate=fixed_collate, grad_accum=2, num_workers=2, n=20),  # prefetching workers; epoch boundary mid-step
        dict(collate=fixed_collate, grad_accum=2, num_workers=1, n=20, sampler="real"),
    ],
    ids=["global-rng-collate", "workers-accumulation", "components.data-sampler"],
)
def test_resumed_run_matches_uninterrupted_run(tmp_path, variant):
    """Crashed after the step-4 checkpoint and resumed, the final weights equal an uninterrupted run's."""
    if variant.get("sampler") == "real":  # the data package's sampler
        variant = {**variant, "sampler": ResumableDistributedSampler}
    straight = make_trainer(tmp_path / "a", **variant).train()
    assert straight.steps == 6 and straight.resumed_from is None and math.isfinite(straight.final_loss)

    per_step = variant["grad_accum"]
    with pytest.raises(Crash):
        make_trainer(tmp_path / "b", loss_fn=crashing(pretraining_loss, 4 * per_step + 1), **variant).train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == [2, 4]
    # A different model initialisation and seeded RNG: everything must come from the checkpoint. The eval
    # function draws random numbers; the trainer must keep them out of the training streams.
    random.random(), np.random.rand(), torch.rand(3)
    resumed = make_trainer(
        tmp_path / "b", seed=0, model=ViLBertForPretraining(preset("tiny")), eval_fn=lambda m, s: {"r": torch.rand(()).item()}, eval_every=1, **variant
    ).train()  # fmt: skip
    assert resumed.resumed_step == 4 and resumed.resumed_from == tmp_path / "b" / "checkpoints" / "step-000004"
    assert resumed.steps == 6 and resumed.final_loss == straight.final_loss
    assert set(resumed.eval_metrics) == {"r"}
    assert_same_weights(tmp_path / "a" / "final", tmp_path / "b" / "final")
    # the curves of the crashed-and-resumed run are the uninterrupted run's, step for step
    curves = {run: loss_series(tmp_path / run / HISTORY) for run in "ab"}
    train = {run: {k: v for k, v in c.items() if k.startswith("train/")} for run, c in curves.items()}
    assert train["a"] == train["b"] and train["a"]["train/loss"][0] == [float(s) for s in range(1, 7)]
    assert "eval/r" in curves["b"] and "train/lr" not in curves["a"]
    for run in "ab":
        assert (tmp_path / run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    make_trainer(tmp_path, max_steps=8, keep_last=3).train()
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 6, 8]
    with open(root / "step-000008" / "model.safetensors", "r+b") as fh:  # flip bytes in the weights
        fh.seek(-16, os.SEEK_END)
        fh.write(b"\xff" * 16)
    (root / "step-000006" / "manifest.json").unlink()  # as if the crash hit before the manifest
    (root / "step-000010.tmp").mkdir()  # a half-written checkpoint
    result = make_trainer(tmp_path, max_steps=8, keep_last=3).train()
    assert result.resumed_step == 4 and result.steps == 8
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-000004", "step-000006", "step-000006.corrupt", "step-000008", "step-000008.corrupt"]
    assert "does not match its sha256" in caplog.text and "no manifest.json" in caplog.text
    for name in ("step-000006", "step-000008"):
        ckpt.verify_checkpoint(root / name)


def test_state_file_is_loaded_weights_only(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    folder = tmp_path / "checkpoints" / "step-000002"
    state = ckpt.load_training_state(folder)
    assert state["step"] == 2 and state["sampler"] == [{"seed": 0, "epoch": 0, "position": 8}]
    assert {"optimizer", "scheduler", "rng", "lineage", "config"} <= set(state)
    torch.save({"step": 2, "payload": Crash("not a tensor")}, folder / ckpt.STATE_FILE)  # an arbitrary object
    with pytest.raises(ckpt.CorruptCheckpoint, match="weights-only"):
        ckpt.load_training_state(folder)


def test_keeps_only_last_k_checkpoints(tmp_path):
    result = make_trainer(tmp_path, max_steps=7, keep_last=2, checkpoint_every=2).train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000007"]  # the last step always saves
    assert result.checkpoint == root / "step-000007"
    assert ckpt.verify_checkpoint(root / "step-000007")["step"] == 7


def test_frozen_parameters_keep_their_values_and_get_no_optimizer_state(tmp_path):
    model = ViLBertForPretraining(preset("tiny"))
    word = model.vilbert.text_embeddings.word.weight
    before, position = word.detach().clone(), model.vilbert.text_embeddings.position.weight.detach().clone()
    trainer = make_trainer(tmp_path, model=model, max_steps=3, freeze=["vilbert.text_embeddings.word"])
    assert trainer.config.freeze == ("vilbert.text_embeddings.word",)
    trainer.train()
    assert not word.requires_grad and torch.equal(word.detach(), before)  # tied to the LM decoder: frozen both
    assert not torch.equal(model.vilbert.text_embeddings.position.weight.detach(), position)  # the rest trains
    state = ckpt.load_training_state(tmp_path / "checkpoints" / "step-000002")["optimizer"]
    shapes = {tuple(s["exp_avg"].shape) for s in state["state"].values()}
    assert tuple(word.shape) not in shapes
    with pytest.raises(ValueError, match="no parameter name starts with 'vilbert.txt'"):
        make_trainer(tmp_path / "typo", max_steps=1, freeze=["vilbert.txt"]).train()
    with pytest.raises(TrainerConfigError, match="freeze"):
        TrainerConfig(output_dir=tmp_path, max_steps=1, freeze=("",))


def test_without_kept_checkpoints_the_last_step_is_not_written_only_to_be_deleted(tmp_path, monkeypatch):
    written = []
    real = ckpt.write_checkpoint
    monkeypatch.setattr(
        ckpt, "write_checkpoint", lambda root, step, *a, **k: written.append(step) or real(root, step, *a, **k)
    )
    result = make_trainer(tmp_path, max_steps=5, checkpoint_every=2, keep_checkpoints=False).train()
    assert written == [2, 4] and result.final_dir == tmp_path / "final"
    assert not (tmp_path / "checkpoints").exists() and result.checkpoint is None
    written.clear()
    make_trainer(tmp_path / "kept", max_steps=5, checkpoint_every=2).train()
    assert written == [2, 4, 5]


def test_refuses_to_resume_on_other_data(tmp_path):
    make_trainer(tmp_path, max_steps=2, data_hash="aaa", feature_spec_hash="spec1").train()
    with pytest.raises(ckpt.ResumeMismatch, match="data_hash=aaa.*data_hash=bbb"):
        make_trainer(tmp_path, max_steps=4, data_hash="bbb", feature_spec_hash="spec1").train()
    result = make_trainer(tmp_path, max_steps=4, data_hash="bbb", feature_spec_hash="spec1", force_resume=True).train()
    assert result.resumed_step == 2 and result.steps == 4
    with pytest.raises(ckpt.CheckpointError, match="resume is off"):
        make_trainer(tmp_path, max_steps=4, resume=False).train()


def test_final_export_is_a_native_checkpoint(tmp_path):
    """fine-tuning shape: the tasks model, VQA head only, with a feature spec attached; plus a tracker."""

    class Recorder:
        def __init__(self):
            self.metrics, self.params, self.artifacts = [], {}, []

        def log_artifact(self, path, artifact_path=None):
            self.artifacts.append((Path(path).name, artifact_path))

        def log_metrics(self, metrics, step):
            self.metrics.append((step, dict(metrics)))

        def log_params(self, params, prefix=""):
            self.params.update({f"{prefix}.{k}": v for k, v in params.items()})

    spec = {"backend": "demo", "feature_size": 24, "num_classes": 11}
    torch.manual_seed(0)
    model = ViLBertForTasks(preset("tiny"), num_answers=5)
    recorder = Recorder()
    outcome = make_trainer(
        tmp_path, model=model, loss_fn=vqa_loss, collate=fixed_collate, max_steps=None, epochs=1, log_every=2,
        tracker=recorder, feature_spec=spec,
    ).train()  # fmt: skip
    assert outcome.steps == 6 and outcome.epochs == 1.0  # 24 examples / batch 4
    loaded = load_checkpoint(tmp_path / "final")
    assert isinstance(loaded, ViLBertForTasks)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert read_feature_spec(tmp_path / "final") == spec
    assert read_feature_spec(tmp_path / "checkpoints" / "step-000006") == spec
    assert [s for s, _ in recorder.metrics] == [2, 4, 6]
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/epoch"} <= set(recorder.metrics[-1][1])
    assert recorder.params["trainer.total_steps"] == 6
    assert recorder.artifacts == [("training_curves.png", "curves")]
    assert json.loads((tmp_path / "final" / "config.json").read_text())["kind"] == "tasks"
