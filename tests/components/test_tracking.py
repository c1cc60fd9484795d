"""Tracking against real MLflow: a sqlite store, a real `mlflow server` over HTTP, and an unreachable server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from components.tracking import FALLBACK_FILE, PARENT_RUN_ENV, Tracker, TrackingConfig, flatten, git_commit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def fallback_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / FALLBACK_FILE).read_text().splitlines()]


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}, "cfg") == {
        "cfg.a.b": "1",
        "cfg.a.c": "[1, 2]",
        "cfg.d": "None",
    }


def test_step_run_nested_under_pipeline_run(sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)  # the default store when tracking_uri is not given
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    with Tracker(TrackingConfig("pipeline-a", "pipeline", system_metrics=False)) as parent:
        assert parent.run_id and not parent.degraded
        monkeypatch.setenv(PARENT_RUN_ENV, parent.run_id)  # what the pipeline hands to its steps
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
        (tmp_path / "plot.png").write_bytes(b"\x89PNG fake")
        cfg = TrackingConfig("ignored-when-nested", "pretrain", output_dir=tmp_path, system_metrics=False)
        with Tracker(cfg) as step:
            step.log_config({"trainer": {"lr": 0.001, "betas": [0.9, 0.999]}, "preset": "tiny"})
            for i in (1, 2, 3):
                step.log_metrics({"train/loss": 1.0 / i}, step=i)
            step.log_lineage(data_hash="d" * 8, feature_spec_hash="f" * 8, checkpoint_hash="c" * 8)
            step.log_artifact(tmp_path / "ckpt", "final")
            step.log_artifact(tmp_path / "plot.png")
    c = client(sqlite_uri)
    run = c.get_run(step.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert run.info.experiment_id == c.get_run(parent.run_id).info.experiment_id
    assert run.data.params == {"trainer.lr": "0.001", "trainer.betas": "[0.9, 0.999]", "preset": "tiny"}
    assert [(m.step, m.value) for m in c.get_metric_history(step.run_id, "train/loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
    ]
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id
    assert tags["lineage.data_hash"] == "d" * 8 and tags["lineage.checkpoint_hash"] == "c" * 8
    assert tags["lineage.git_commit"] == git_commit() and len(tags["lineage.git_commit"]) == 40
    assert sorted(a.path for a in c.list_artifacts(step.run_id)) == ["config.json", "final", "plot.png"]
    assert [a.path for a in c.list_artifacts(step.run_id, "final")] == ["final/model.safetensors"]
    config = json.loads(Path(c.download_artifacts(step.run_id, "config.json", str(tmp_path / "dl"))).read_text())
    assert config["trainer"]["lr"] == 0.001
    assert not (tmp_path / FALLBACK_FILE).exists()


def test_failed_step_and_other_ranks(sqlite_uri, tmp_path):
    cfg = TrackingConfig("ranks", "finetune", output_dir=tmp_path, tracking_uri=sqlite_uri, system_metrics=False)
    with pytest.raises(ZeroDivisionError), Tracker(cfg) as tracker:
        tracker.log_metrics({"x": 1.0}, step=0)
        1 / 0  # noqa: B018
    assert client(sqlite_uri).get_run(tracker.run_id).info.status == "FAILED"
    other = TrackingConfig("ranks", "finetune", output_dir=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/r1.db")
    with Tracker(other, rank=1) as quiet:  # rank 1: no run, no store, no files
        quiet.log_params({"a": 1})
        quiet.log_metrics({"x": 1.0}, step=1)
    assert quiet.run_id is None and sorted(p.name for p in tmp_path.iterdir()) == []


def test_resume_key_continues_an_unfinished_run(sqlite_uri, tmp_path):
    cfg = TrackingConfig("restarts", "pretrain", tracking_uri=sqlite_uri, resume_key="job-1", system_metrics=False)
    first = Tracker(cfg).start()
    first.log_metrics({"loss": 2.0}, step=1)  # then the worker dies: the run is never ended
    second = Tracker(cfg).start()
    second.log_metrics({"loss": 1.0}, step=2)
    second.end()
    assert second.run_id == first.run_id
    assert [m.step for m in client(sqlite_uri).get_metric_history(first.run_id, "loss")] == [1, 2]
    third = Tracker(cfg).start()  # the earlier run FINISHED: a new one
    assert third.run_id != first.run_id
    third.end()


def test_unreachable_server_falls_back_to_local_log(tmp_path):
    cfg = TrackingConfig("x", "pretrain", output_dir=tmp_path, tracking_uri="http://127.0.0.1:9", connect_timeout_s=2)
    (tmp_path / "final").mkdir()
    with pytest.warns(RuntimeWarning, match="127.0.0.1:9") as caught, Tracker(cfg) as tracker:
        tracker.log_config({"lr": 0.1})
        tracker.log_metrics({"loss": 0.5}, step=3)
        tracker.log_lineage(data_hash="abc")
        tracker.log_artifact(tmp_path / "final")
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1 and tracker.degraded
    lines = fallback_lines(tmp_path)
    kinds = [line["kind"] for line in lines]
    assert kinds == ["degraded", "start", "params", "config", "metrics", "tags", "artifact", "end"]
    by_kind = {line["kind"]: line["data"] for line in lines}
    assert by_kind["metrics"] == {"step": 3, "values": {"loss": 0.5}}
    assert by_kind["params"] == {"lr": "0.1"} and by_kind["config"]["config"] == {"lr": 0.1}
    assert by_kind["tags"] == {"lineage.data_hash": "abc"} and by_kind["end"] == {"status": "FINISHED"}
    assert by_kind["artifact"]["path"] == str((tmp_path / "final").resolve())


def test_training_finishes_when_tracking_server_is_down(tmp_path, recwarn):
    from tests.components.test_trainer import make_trainer

    cfg = TrackingConfig("x", "pretrain", output_dir=tmp_path, tracking_uri="http://127.0.0.1:9", connect_timeout_s=2)
    with Tracker(cfg) as tracker:
        result = make_trainer(tmp_path, max_steps=3, log_every=1, tracker=tracker).train()
    assert result.steps == 3 and (tmp_path / "final" / "model.safetensors").exists()
    steps = [line["data"]["step"] for line in fallback_lines(tmp_path) if line["kind"] == "metrics"]
    assert steps == [1, 2, 3]
    assert len([w for w in recwarn if "MLflow tracking" in str(w.message)]) == 1


# ---- a real MLflow server over HTTP ---------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free loopback port (sqlite backend, local artifacts); stopped afterwards."""
    from components.training.launch import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (tmp_path / "server.log").read_text()[-3000:]
                    raise RuntimeError(f"mlflow server did not start:\n{tail}") from None
                time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_http_round_trip_then_server_dies(mlflow_server, tmp_path, monkeypatch):
    url, proc = mlflow_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast once the server is gone
    (tmp_path / "metrics.json").write_text('{"accuracy": 0.5}')
    cfg = TrackingConfig("http", "evaluate", output_dir=tmp_path / "out", tracking_uri=url, system_metrics=False)
    tracker = Tracker(cfg).start()
    tracker.log_params({"batch_size": 8})
    tracker.log_metrics({"accuracy": 0.5}, step=1)
    tracker.log_artifact(tmp_path / "metrics.json")
    run = client(url).get_run(tracker.run_id)
    assert run.data.params == {"batch_size": "8"} and run.data.metrics == {"accuracy": 0.5}
    assert [a.path for a in client(url).list_artifacts(tracker.run_id)] == ["metrics.json"]
    assert not tracker.degraded

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(15)
    with pytest.warns(RuntimeWarning, match="continuing without it"):
        tracker.log_metrics({"accuracy": 0.75}, step=2)
    tracker.end()
    lines = fallback_lines(tmp_path / "out")
    assert [line["kind"] for line in lines] == ["degraded", "metrics", "end"]
    assert (
        lines[1]["data"] == {"step": 2, "values": {"accuracy": 0.75}} and lines[0]["data"]["run_id"] == tracker.run_id
    )


def test_system_metrics_are_logged(sqlite_uri):
    cfg = TrackingConfig("sysmetrics", "pretrain", tracking_uri=sqlite_uri, system_metrics_interval_s=0.2)
    with Tracker(cfg) as tracker:
        time.sleep(1.0)
    metrics = client(sqlite_uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
