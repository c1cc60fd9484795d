"""The MLflow server as the manifests start it, really started: basic-auth, allowed hosts, artifacts to S3.

The Deployment's arguments and ConfigMap settings are read from infra/k8s/base and run with two substitutions,
because this machine has neither PostgreSQL nor MinIO: SQLite for the stores (the same SQLAlchemy path) and a
moto S3 server on loopback for the bucket. Then the setup Job's user script runs against it, and a pipeline
client logs a run with an artifact that must land in the bucket (both in this process). Needs MLflow's auth extra (Flask-WTF): the
server image installs it (infra/docker/mlflow-server.lock); without it the test is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

from components.training.launch import free_port
from tests.infra.k8s_checks import K8S

pytest.importorskip("mlflow", reason="mlflow is not installed")
pytest.importorskip("flask_wtf", reason="Flask-WTF (mlflow[auth]) is not installed: the basic-auth app needs it")

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ADMIN, ADMIN_PASSWORD = "admin", "CHANGE_ME_admin_pw_1"
PIPELINE, PIPELINE_PASSWORD = "vilbert-pipeline", "CHANGE_ME_pipeline_pw_1"


def _settings() -> dict[str, str]:
    lines = (K8S / "base" / "config" / "settings.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _server_args(settings: dict[str, str], port: int, sqlite: Path) -> list[str]:
    """The Deployment's args with $(VAR) expanded from the ConfigMap, pointed at this machine."""
    documents = yaml.safe_load_all((K8S / "base" / "mlflow.yaml").read_text())
    container = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = [re.sub(r"\$\((\w+)\)", lambda m: settings[m.group(1)], a) for a in container["args"]]
    replaced = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--workers": "1",
        "--backend-store-uri": f"sqlite:///{sqlite}",
    }
    out = []
    for arg in args:
        key = arg.split("=", 1)[0]
        out.append(f"{key}={replaced[key]}" if key in replaced else arg)
    assert out[0] == "server" and "--app-name=basic-auth" in out
    return out


def _get(url: str, host: str | None = None, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if host:
        request.add_header("Host", host)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def mlflow_server(tmp_path, moto_endpoint):
    """The server process; yields (url, settings, environment of the server)."""
    import boto3

    settings = _settings()
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    for bucket in settings["VILBERT_BUCKETS"].split():  # what Job vilbert-minio-setup does
        s3.create_bucket(Bucket=bucket)
    auth_ini = tmp_path / "basic_auth.ini"
    ini = (K8S / "base" / "config" / "basic_auth.ini").read_text()
    auth_ini.write_text(re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{tmp_path / 'auth.db'}", ini))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))},
        "HOME": str(tmp_path),
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "CHANGE_ME_flask_key",
        "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": settings["AWS_DEFAULT_REGION"],
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    port = free_port()
    command = [sys.executable, "-m", "mlflow", *_server_args(settings, port, tmp_path / "mlflow.db")]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _get_or_none(f"{url}/health") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, settings, env, s3
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url)
    except (urllib.error.URLError, OSError):
        return None


def test_mlflow_server_as_deployed(mlflow_server, tmp_path, monkeypatch):
    url, settings, _, s3 = mlflow_server
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    # Kubelet probes: /health with the pod IP as Host, no credentials.
    assert _get(f"{url}/health", host="10.1.2.3:5000") == 200
    # Basic auth on the API; the in-cluster Service name is an allowed Host, another name is not.
    assert _get(api) == 401
    assert _get(api, auth=(ADMIN, ADMIN_PASSWORD)) == 200
    assert _get(api, host="vilbert-mlflow:5000", auth=(ADMIN, ADMIN_PASSWORD)) == 200
    assert _get(api, host="vilbert-mlflow.vilbert.svc.cluster.local:5000", auth=(ADMIN, ADMIN_PASSWORD)) == 200
    assert _get(api, host="evil.example.com", auth=(ADMIN, ADMIN_PASSWORD)) == 403

    # Job vilbert-mlflow-user: creates the pipeline account, and on a second run sets its password again.
    # Run in this process (importing MLflow once more per step would triple the test's time).
    spec = importlib.util.spec_from_file_location("mlflow_sync_user", K8S / "base" / "config" / "mlflow_sync_user.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    sync.wait_for_server(url, timeout_s=30)
    assert sync.sync_user(url, PIPELINE, PIPELINE_PASSWORD) == "created"
    assert sync.sync_user(url, PIPELINE, PIPELINE_PASSWORD) == "updated"
    assert _get(api, auth=(PIPELINE, PIPELINE_PASSWORD)) == 200
    assert _get(api, auth=(PIPELINE, "wrong")) == 401

    # A pipeline step: tracking credentials only, no S3 credentials; the server proxies the artifact to S3.
    from mlflow import MlflowClient

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE_PASSWORD)
    client = MlflowClient(tracking_uri=url)
    experiment_id = client.create_experiment("infra-e2e")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5)
    note = tmp_path / "note.txt"
    note.write_text("hello from a pipeline step\n")
    client.log_artifact(run.info.run_id, str(note))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), "artifacts must go through the server's proxy"
    bucket = settings["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [k for k in keys if run.info.run_id in k and k.endswith("/artifacts/note.txt")], keys
