"""No races: 20 rounds of two processes registering at the same moment against a real ``mlflow server`` end with
the aliases the gate's rules say, every round; the registry lock waits for its holder and breaks an expired one.

The processes run the register step's own gate (``components.steps.register.gate_version``, what ``vilbert register``
calls once its version is logged) on versions created through the server, so a round takes a second, not the
minute two full registrations of a model take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.steps.register import gate_version
from tests.components.test_registry_events import aliases, make_versions, wait_for

ROOT = Path(__file__).resolve().parents[3]

WORKER = """
import json, sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
from components.steps.register import gate_version
uri, name, folder, me, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
client = MlflowClient(uri, registry_uri=uri)
run = client.create_run(client.get_experiment_by_name("race").experiment_id).info.run_id
for r in range(rounds):
    while not (folder / f"go-{r}").exists():
        time.sleep(0.005)
    value = float(json.loads((folder / f"go-{r}").read_text())[me])
    version = str(client.create_model_version(name, f"runs:/{run}/model", run_id=run).version)
    for key, tag in {"metric.name": "vqa_accuracy", "metric.value": repr(value), "eval.split": "val"}.items():
        client.set_model_version_tag(name, version, key, tag)
    decision = gate_version(client, name, version, "vqa_accuracy", "val", value)
    done = {"version": version, "decision": decision.decision, "challenger_ref": decision.tags()["gate.challenger_version"]}
    (folder / f"done-{me}.tmp").write_text(json.dumps(done))
    (folder / f"done-{me}.tmp").rename(folder / f"done-{r}-{me}")
"""


@pytest.mark.slow
def test_twenty_rounds_of_two_concurrent_gates_leave_the_aliases_the_rules_say(mlflow_server, tmp_path) -> None:
    """Each round both processes register a version that beats the waiting challenger, at the same moment; one
    after the other, the better one must end as challenger, and the second gated must have seen the first."""
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    name, rounds = "race", 20
    client.create_registered_model(name)
    client.create_experiment("race")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, mlflow_server.uri, name, str(tmp_path), me,
                                 str(rounds)], env=env, cwd=ROOT) for me in ("a", "b")]  # fmt: skip
    try:
        for r in range(rounds):
            better = "ab"[r % 2]  # the better version alternates between the processes
            values = {better: 10.0 * r + 2, "ba"[r % 2]: 10.0 * r + 1}  # both beat round r-1's best (10r - 8)
            (tmp_path / "go.tmp").write_text(json.dumps(values))
            (tmp_path / "go.tmp").rename(tmp_path / f"go-{r}")  # whole, at once: both start on it
            done = wait_for(lambda r=r: all((tmp_path / f"done-{r}-{w}").exists() for w in "ab") and
                            [json.loads((tmp_path / f"done-{r}-{w}").read_text()) for w in "ab"], f"round {r}",
                            timeout_s=60)  # fmt: skip
            result = dict(zip("ab", done, strict=True))
            winner, other = result[better], result["ba"[r % 2]]
            now = aliases(client, name)
            assert now == {"challenger": winner["version"]}, (r, result, now)
            assert winner["decision"] == "challenger", (r, result)
            seen = [x for x, y in ((winner, other), (other, winner)) if x["challenger_ref"] == y["version"]]
            assert len(seen) == 1, f"round {r}: exactly one gate must have seen the other's version: {result}"
        for worker in workers:
            assert worker.wait(timeout=60) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert not [m.name for m in client.search_registered_models() if m.name.endswith(".lock")]  # all released


def test_gate_version_waits_for_the_lock_and_breaks_an_expired_one(mlflow_server) -> None:
    from components.registry.lock import EXPIRES_TAG, RegistryLockTimeout, lock_name, registry_lock

    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    name = "locked"
    (version,) = make_versions(client, name, [1.0])
    with (
        registry_lock(client, name),
        pytest.raises(RegistryLockTimeout, match="is held by"),
        registry_lock(client, name, timeout_s=0.5),
    ):
        pass
    client.create_registered_model(lock_name(name), tags={EXPIRES_TAG: str(time.time() - 1)})  # a crashed holder
    decision = gate_version(client, name, version, "vqa_accuracy", "val", 1.0)
    assert decision.decision == "challenger" and aliases(client, name) == {"challenger": version}
