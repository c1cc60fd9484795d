"""The training-throughput benchmark (components.bench.throughput): fast runs on the tiny preset, without the original code."""

from __future__ import annotations

import pytest
import torch

from components.bench.throughput import benchmark, synthetic_batch
from model.config import preset

TIMING_FIELDS = ("samples_per_s", "step_ms", "step_ms_min", "step_ms_max", "peak_rss_mb", "rss_before_training_mb")


def _check_ours(result: dict) -> None:
    assert result["preset"] == "tiny" and result["reference"] is None and result["ratios"] is None
    assert result["parity"] is None
    ours = result["ours"]
    for key in TIMING_FIELDS:
        assert ours[key] > 0, key
    assert ours["train_rss_delta_mb"] >= 0
    assert 0 <= ours["clean_steps"] <= result["steps"] and ours["discarded_steps"] >= 0
    assert torch.isfinite(torch.tensor(ours["last_loss"]))
    assert ours["runs"] and all(x > 0 for x in ours["runs"])
    assert result["torch"] == torch.__version__


def test_synthetic_batch_follows_the_pretraining_conventions():
    config = preset("tiny")
    b = synthetic_batch(config, batch_size=4, text_len=12, regions=7, seed=3)
    assert torch.equal(b["input_ids"], synthetic_batch(config, 4, 12, 7, seed=3)["input_ids"])  # deterministic
    assert b["input_ids"].shape == (4, 12) and b["features"].shape == (4, 7, config.vision.feature_size)
    assert (b["input_ids"][:, 0] == 1).all()  # [CLS] (small vocab ids)
    lengths = b["attention_mask"].sum(1)
    assert lengths[0] == 12 and (lengths >= 6).all()
    assert (b["input_ids"][torch.arange(4), lengths - 1] == 2).all()  # [SEP]
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()  # padding id
    supervised = b["masked_lm_labels"] >= 0
    assert supervised.any(1).all() and not supervised[:, 0].any() and not supervised[b["attention_mask"] == 0].any()
    assert torch.equal(b["boxes"][:, 0], torch.tensor([[0.0, 0, 1, 1, 1]]).expand(4, 5))
    assert (b["region_mask"][:, 0] == 1).all() and (b["region_labels"][:, 0] == -1).all()
    assert ((b["region_labels"] == 1).sum(1) >= 1).all()
    assert not (b["region_labels"][b["region_mask"] == 0] == 1).any()
    real = b["region_labels"] == 1
    assert torch.allclose(b["region_targets"][real].sum(-1), torch.ones(int(real.sum())))
    assert set(b["alignment_labels"].tolist()) <= {0, 1}


def test_benchmark_tiny_in_process():
    result = benchmark(
        "tiny", batch_size=2, text_len=8, regions=5, steps=2, warmup=1, threads=1, isolate=False, max_quiet_wait_s=0
    )
    _check_ours(result)
    assert result["steps"] == 2 and result["threads"] == 1


@pytest.mark.slow
def test_benchmark_tiny_in_a_fresh_process():
    result = benchmark(
        "tiny",
        batch_size=2,
        text_len=8,
        regions=5,
        steps=2,
        warmup=1,
        threads=1,
        optimizer="adamw-fused",
        malloc="tuned",
        max_quiet_wait_s=0,
    )
    _check_ours(result)
    assert result["malloc"] == "tuned" and result["ours"]["page_faults_per_step"] >= 0
    assert result["ours"]["peak_reached_during_training"] in (True, False)


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError):
        benchmark("tiny", steps=0, isolate=False)
    with pytest.raises(ValueError):
        benchmark("tiny", optimizer="sgd", isolate=False)
    with pytest.raises(ValueError):
        benchmark("tiny", malloc="jemalloc", isolate=False)
