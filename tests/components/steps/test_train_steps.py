"""The pretrain and finetune steps on the tiny world: loss falls, the step record, every task from a pretrained
checkpoint and from scratch, bad input (missing features, mismatched spec, empty split), an unreachable MLflow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from components.data.common import EmptySplitError, MissingFeaturesError
from components.data.pretraining_config import PretrainingDataConfig
from components.features import FeatureSpec, FeatureSpecMismatch
from components.steps.common import StepError, TrackingOptions
from components.steps.finetune import FinetuneConfig, run_finetune
from components.steps.pretrain import PretrainConfig, run_pretrain
from components.training.config import TrainerConfig
from model.checkpoint import read_header
from tests.components.test_data_world import SPEC, TINY, World, shared_world, write_store


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


def trainer(out: Path, steps: int, **kw) -> TrainerConfig:
    base = dict(max_steps=steps, batch_size=4, lr=2e-3, warmup_steps=0, checkpoint_every=steps, log_every=1,
                progress=False, device="cpu", cpu_threads=1)  # fmt: skip
    return TrainerConfig(output_dir=out, **{**base, **kw})


def pretrain_config(world: World, out: Path, steps: int = 12, tracking_uri: str | None = None, **kw):
    return PretrainConfig(
        dataset=str(world.root),
        validation=str(world.validation),
        features=str(world.store),
        trainer=trainer(out, steps),
        preset="tiny",
        text_init="none",
        tokenizer=str(world.tokenizer_dir),
        data=PretrainingDataConfig(max_text_length=16),
        tracking=TrackingOptions(tracking_uri=tracking_uri, enabled=tracking_uri is not None),
        **kw,
    )


@pytest.fixture(scope="module")
def pretrained(world: World, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    run_pretrain(pretrain_config(world, out, steps=24, tracking_uri=f"sqlite:///{out.parent / 'steps.db'}"))
    return out


def test_pretraining_loss_falls_and_the_step_is_recorded(pretrained: Path) -> None:
    result = json.loads((pretrained / "result.json").read_text())
    assert result["steps"] == 24 and set(result["metrics"]) >= {"loss", "masked_lm", "masked_region", "alignment"}
    step = json.loads((pretrained / "step.json").read_text())
    assert step["step"] == "pretrain" and step["preset"] == "tiny" and len(step["data_hash"]) == 64
    assert step["feature_spec_hash"] == SPEC.sha256() and step["tracking_run_id"]
    assert read_header(pretrained / "final")["kind"] == "pretraining"
    # the loss of the first steps against the last ones, from the MLflow run the step recorded
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{pretrained.parent / 'steps.db'}")
    history = [m.value for m in client.get_metric_history(step["tracking_run_id"], "train/loss")]
    assert len(history) == 24
    first, last = sum(history[:6]) / 6, sum(history[-6:]) / 6
    assert last < first - 0.15, history


@pytest.mark.parametrize("task", ["vqa", "vcr", "refcoco+", "retrieval"])
@pytest.mark.parametrize("init", ["pretrained", "scratch"])
def test_finetune_every_task(world: World, pretrained: Path, tmp_path: Path, task: str, init: str) -> None:
    config = FinetuneConfig(
        task=task,
        dataset=str(world.root),
        validation=str(world.validation),
        features=str(world.store),
        trainer=trainer(tmp_path / "ft", 3, batch_size=2),
        init=init,
        pretrained=str(pretrained),
        preset="tiny",
        text_init="none",
        tokenizer=None if init == "pretrained" else str(world.tokenizer_dir),
        answer_min_count=1,
        head_lr_mult=10.0,
        tracking=TrackingOptions(enabled=False),
    )
    result = run_finetune(config)
    assert result.steps == 3 and result.final_loss == result.final_loss  # finite, not NaN
    step = json.loads((tmp_path / "ft" / "step.json").read_text())
    assert step["task"] == task and step["init"] == init
    head = {"vqa": "answer", "refcoco+": "region"}.get(task, "pair")  # the task's own (fresh) head
    assert step["config"]["trainer"]["lr_multipliers"] == [[f"{head}.", 10.0]]
    assert (step["init_from"] is not None) == (init == "pretrained")
    header = read_header(tmp_path / "ft" / "final")
    assert header["kind"] == "tasks"
    if task == "vqa":
        vocab = json.loads((tmp_path / "ft" / "answer_vocab.json").read_text())
        assert header["num_answers"] == len(vocab["answers"]) > 1


def test_finetune_from_pretrained_starts_from_its_weights(world: World, pretrained: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = FinetuneConfig(task="refcoco+", dataset=str(world.root), validation=str(world.validation),
                            features=str(world.store), trainer=trainer(tmp_path / "ft", 1, lr=1e-12),
                            init="pretrained", pretrained=str(pretrained), tracking=TrackingOptions(enabled=False))  # fmt: skip
    run_finetune(config)
    before = load_file(str(pretrained / "final" / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "final" / "model.safetensors"))
    key = "vilbert.vision_embeddings.features.weight"
    key = key if key in before else next(k for k in before if k.startswith("vilbert.") and k.endswith(".weight"))
    assert (before[key] - after[key]).abs().max() < 1e-6


def test_missing_features_is_a_clear_error(world: World, tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_store(world.root, store, skip=frozenset({"syn-000002", "syn-000007"}))
    bad = PretrainConfig(**{**pretrain_config(world, tmp_path / "out").__dict__, "features": str(store)})
    with pytest.raises(MissingFeaturesError, match="without features"):
        run_pretrain(bad)


def test_feature_spec_that_does_not_fit_the_model(world: World, tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_store(world.root, store, spec=FeatureSpec("demo", None, feature_size=7, num_classes=TINY.vision.target_size,
                                                    min_boxes=1, max_boxes=12))  # fmt: skip
    bad = PretrainConfig(**{**pretrain_config(world, tmp_path / "out").__dict__, "features": str(store)})
    with pytest.raises(FeatureSpecMismatch, match="feature_size 7"):
        run_pretrain(bad)


def test_finetune_refuses_a_store_other_than_the_pretraining_one(world: World, pretrained: Path, tmp_path: Path):
    store = tmp_path / "store"
    write_store(world.root, store, spec=FeatureSpec("detector", None, feature_size=TINY.vision.feature_size,
                                                    num_classes=TINY.vision.target_size, min_boxes=1, max_boxes=12))  # fmt: skip
    config = FinetuneConfig(task="vqa", dataset=str(world.root), features=str(store), init="pretrained",
                            pretrained=str(pretrained), trainer=trainer(tmp_path / "ft", 1),
                            tracking=TrackingOptions(enabled=False))  # fmt: skip
    with pytest.raises(StepError, match="does not match the features"):
        run_finetune(config)


def test_empty_split_is_a_clear_error(world: World, tmp_path: Path) -> None:
    base = pretrain_config(world, tmp_path / "out")
    bad = PretrainConfig(**{**base.__dict__, "data": PretrainingDataConfig(split="no-such-split")})
    with pytest.raises(EmptySplitError, match="no-such-split"):
        run_pretrain(bad)


def test_bad_settings_fail_before_training(world: World, tmp_path: Path) -> None:
    with pytest.raises(StepError, match="unknown task"):
        FinetuneConfig(task="nlvr2", dataset="d", features="f", trainer=trainer(tmp_path, 1))
    with pytest.raises(StepError, match="head_lr_mult"):
        FinetuneConfig(task="vqa", dataset="d", features="f", head_lr_mult=0.0, trainer=trainer(tmp_path, 1))
    clash = dataclasses.replace(trainer(tmp_path, 1), lr_multipliers=(("pair.", 5.0),))
    with pytest.raises(StepError, match="set one of them"):
        FinetuneConfig(task="vqa", dataset="d", features="f", head_lr_mult=30.0, trainer=clash)
    same = dataclasses.replace(trainer(tmp_path, 1), lr_multipliers=(("answer.", 30.0),))  # as read from step.json
    assert FinetuneConfig(task="vqa", dataset="d", features="f", head_lr_mult=30.0, trainer=same).trainer == same
    with pytest.raises(StepError, match="needs the pretrain output"):
        FinetuneConfig(task="vqa", dataset="d", features="f", init="pretrained", trainer=trainer(tmp_path, 1))
    with pytest.raises(StepError, match="not a feature store"):
        run_pretrain(PretrainConfig(**{**pretrain_config(world, tmp_path / "o").__dict__, "features": str(tmp_path)}))


def test_unreachable_mlflow_server_training_finishes_and_keeps_everything(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="MLflow tracking at http://127.0.0.1:9 failed"):
        result = run_pretrain(pretrain_config(world, out, steps=3, tracking_uri="http://127.0.0.1:9"))
    assert result.steps == 3 and (out / "final" / "model.safetensors").exists()
    fallback = [json.loads(line) for line in (out / "tracking_fallback.jsonl").read_text().splitlines()]
    kinds = [row["kind"] for row in fallback]
    assert kinds[0] == "degraded" and "metrics" in kinds and "params" in kinds
    steps = [
        row["data"]["step"] for row in fallback if row["kind"] == "metrics" and "train/loss" in row["data"]["values"]
    ]
    assert steps == [1, 2, 3]
