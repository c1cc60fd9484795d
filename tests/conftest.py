"""Shared fixtures: tiny models, a small valid batch, the reference vectors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(os.environ.get("VILBERT_REFERENCE_DIR", ROOT / "tests" / "data" / "reference_vilbert"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert (REFERENCE_DIR / "README.txt").exists(), f"reference vectors missing at {REFERENCE_DIR}"
    return REFERENCE_DIR


def make_batch(config, batch: int = 3, tokens: int = 9, regions: int = 6, seed: int = 0) -> dict:
    """A valid trunk batch for ``config`` with padding in the last rows."""
    g = torch.Generator().manual_seed(seed)
    t, v = config.text, config.vision
    input_ids = torch.randint(5, t.vocab_size, (batch, tokens), generator=g)
    input_ids[:, 0] = 1
    attention_mask = torch.ones(batch, tokens, dtype=torch.long)
    region_mask = torch.ones(batch, regions, dtype=torch.long)
    if batch > 1:
        attention_mask[-1, tokens - 3 :] = 0
        input_ids[-1, tokens - 3 :] = 0
        region_mask[-1, regions - 2 :] = 0
    xy = torch.rand(batch, regions, 2, generator=g) * 0.5
    wh = torch.rand(batch, regions, 2, generator=g) * 0.4 + 0.05
    boxes = torch.cat([xy, xy + wh, wh[..., :1] * wh[..., 1:]], -1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    return {
        "input_ids": input_ids,
        "features": torch.rand(batch, regions, v.feature_size, generator=g) * 2,
        "boxes": boxes,
        "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "attention_mask": attention_mask,
        "region_mask": region_mask,
    }


def make_labels(config, batch_inputs: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = batch_inputs["input_ids"]
    b, r = batch_inputs["region_mask"].shape
    lm = torch.full_like(ids, -1)
    lm[:, 2] = torch.randint(5, config.text.vocab_size, (b,), generator=g)
    region_labels = torch.full((b, r), -1, dtype=torch.long)
    region_labels[:, 1] = 1
    targets = torch.softmax(torch.randn(b, r, config.vision.target_size, generator=g), -1)
    return {
        "masked_lm_labels": lm,
        "region_labels": region_labels,
        "region_targets": targets,
        "alignment_labels": torch.tensor([i % 2 for i in range(b)]),
    }


# --- S3: a real moto server on loopback (never a mocked boto3) ---


@pytest.fixture(scope="session")
def moto_endpoint():
    """Start one moto S3 server on 127.0.0.1 (free port) for the session; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the test log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Point the standard AWS environment at the moto server (fake credentials, no ~/.aws files)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)  # the same every test, so the cached client is reused
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return moto_endpoint


@pytest.fixture
def s3_bucket(s3_env, request) -> str:
    """A fresh, empty bucket on the moto server for this test; yields ``s3://<name>``."""
    import re
    import uuid

    from components.storage import s3_client

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


# --- MLflow: a real `mlflow server` on loopback (webhooks to 127.0.0.1 allowed) ---


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """Start one ``mlflow server`` on 127.0.0.1 (free port, sqlite store in a temporary folder) for the session,
    with the environment `make ui` gives it; yields a namespace with ``uri``, ``store``, ``log`` and ``artifacts``."""
    from types import SimpleNamespace

    from components.registry.ui import load_state, server_env, start_mlflow_server, stop_process
    from components.training.launch import free_port

    base = tmp_path_factory.mktemp("mlflow_server")
    state = load_state(base / "state.json")
    port = free_port()
    store = f"sqlite:///{base / 'mlflow.db'}"
    log = base / "server.log"
    proc = start_mlflow_server(store, "127.0.0.1", port, server_env(state["encryption_key"]), log,
                               artifacts=str(base / "artifacts"), cwd=base)  # fmt: skip
    yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", store=store, log=log, artifacts=base / "artifacts")
    stop_process(proc)
