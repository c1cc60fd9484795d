"""Registry events against a real ``mlflow server`` on 127.0.0.1: signed webhooks reach our listener, which audits
every alias change, keeps ``previous-champion`` after a promotion made outside ``vilbert promote`` (as the UI makes
it: a REST call that sets the alias), flags broken rules.  Concurrent gates: test_registry_race.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.registry.events import (
    ALIAS_HISTORY_TAG,
    EVENTS_PATH,
    JsonServer,
    SignatureError,
    WebhookEndpoint,
    event_route,
    sign,
)
from components.registry.rules import HISTORY_TAG, VIOLATIONS_TAG, promote, rollback
from components.registry.ui import Listener


def body(name: str = "m", alias: str = "champion", version: str = "2") -> bytes:
    data = {"name": name, "alias": alias, "version": version}
    return json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "t", "data": data}).encode()


def headers(secret: str, payload: bytes, stamp: int | None = None, delivery: str | None = None) -> dict[str, str]:
    delivery, stamp_text = delivery or uuid.uuid4().hex, str(int(time.time()) if stamp is None else stamp)
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp_text,
            "X-MLflow-Signature": sign(secret, delivery, stamp_text, payload)}  # fmt: skip


def test_only_signed_fresh_unseen_deliveries_are_accepted() -> None:
    endpoint = WebhookEndpoint("s3cret")
    payload = body()
    good = headers("s3cret", payload)
    event = endpoint.parse({k.lower(): v for k, v in good.items()}, payload)
    assert (event.kind, event.name, event.alias, event.version) == ("model_version_alias.created", "m", "champion", "2")
    with pytest.raises(SignatureError, match="already received"):
        endpoint.parse(good, payload)  # a replay
    with pytest.raises(SignatureError, match="bad signature"):
        endpoint.parse(headers("s3cret", payload), body(version="3"))  # the body changed after signing
    with pytest.raises(SignatureError, match="bad signature"):
        endpoint.parse(headers("other", payload), payload)
    with pytest.raises(SignatureError, match=r"signed 10\d\d s ago \(more than 300 s\)"):
        endpoint.parse(headers("s3cret", payload, stamp=int(time.time()) - 1000), payload)
    with pytest.raises(SignatureError, match="unsigned"):
        endpoint.parse({}, payload)
    # over HTTP: 401 for a bad signature, the handler's answer for a good one
    server = JsonServer({("POST", EVENTS_PATH): event_route(endpoint, lambda e: {"got": e.version})}).start()
    try:
        for sent, status in ((headers("wrong", payload), 401), (headers("s3cret", payload), 200)):
            request = urllib.request.Request(server.url + EVENTS_PATH, payload, sent)
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    assert (resp.status, json.loads(resp.read())) == (status, {"got": "2"})
            except urllib.error.HTTPError as error:
                assert error.code == status == 401 and "bad signature" in error.read().decode()
    finally:
        server.stop()


# --- a real mlflow server and the listener ------------------------------------------------------------------


def make_versions(client: MlflowClient, name: str, values: list[float | None]) -> list[str]:
    """Versions of ``name`` as `vilbert register` tags them (metric, split, gate passed); None: no evaluation."""
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"exp-{name}")).info.run_id
    versions = []
    for value in values:
        version = str(client.create_model_version(name, f"runs:/{run}/model", run_id=run).version)
        if value is not None:
            for key, tag in {"metric.name": "vqa_accuracy", "metric.value": repr(value), "eval.split": "val",
                             "gate.decision": "challenger"}.items():  # fmt: skip
                client.set_model_version_tag(name, version, key, tag)
        versions.append(version)
    return versions


def wait_for(check, what: str, timeout_s: float = 30.0, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (
            f"; server log:\n{log.read_text()[-4000:]}" if log else ""
        )
        time.sleep(0.2)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def history(client: MlflowClient, name: str, tag: str = ALIAS_HISTORY_TAG) -> list[dict]:
    return json.loads(client.get_registered_model(name).tags.get(tag) or "[]")


@pytest.fixture(scope="module")
def listener(mlflow_server):
    listener = Listener(mlflow_server.uri, "listener-secret", log=print).start()
    yield listener
    listener.stop()


def test_a_promotion_outside_vilbert_is_audited_keeps_previous_champion_and_rolls_back(mlflow_server, listener) -> None:
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    name = "events-ui"
    v1, v2, v3 = make_versions(client, name, [40.0, 45.0, None])
    client.set_registered_model_alias(name, "challenger", v2)  # as the gate would
    promote(name, "first, checked by hand", version=v1, actor="ann", tracking_uri=mlflow_server.uri)
    wait_for(
        lambda: any(r["alias"] == "champion" for r in history(client, name)),
        "the first champion event",
        log=mlflow_server.log,
    )
    client.set_registered_model_alias(name, "champion", v2)  # what the UI's alias editor sends
    # the listener keeps the old champion as previous-champion; the challenger alias went with the promotion
    wait_for(lambda: aliases(client, name) == {"champion": v2, "previous-champion": v1}
             and len(history(client, name, HISTORY_TAG)) == 2
             and [r for r in history(client, name) if r["alias"] == "champion"][1:], "previous-champion and the records")  # fmt: skip
    moves = history(client, name, HISTORY_TAG)
    assert [(m["action"], m["champion"], m["replaced"], m["actor"], m["source"]) for m in moves] == [
        ("promote", v1, None, "ann", "vilbert"), ("promote", v2, v1, "mlflow-ui", "mlflow-ui")]  # fmt: skip
    assert moves[1]["reason"] == "set in the MLflow UI" and moves[1]["violations"] == []
    tags = client.get_model_version(name, v2).tags
    assert tags["champion.promoted_by"] == "mlflow-ui" and tags["champion.replaced_version"] == v1
    champion_events = [r for r in history(client, name) if r["alias"] == "champion"]
    assert [(r["version"], r["previous"], r["source"]) for r in champion_events] == [
        (v1, None, "vilbert promote"), (v2, v1, "mlflow-ui")]  # fmt: skip
    assert champion_events[1]["at"].endswith("+00:00") and champion_events[1]["delivery_id"]
    # `vilbert rollback` undoes the UI promotion
    back = rollback(name, "v2 answers badly", actor="bo", tracking_uri=mlflow_server.uri)
    assert (back.champion, back.replaced) == (v1, v2)
    assert aliases(client, name) == {"champion": v1}
    wait_for(lambda: [r for r in history(client, name) if r["alias"] == "champion"][2:], "the rollback event")
    assert len(history(client, name, HISTORY_TAG)) == 3  # the listener did not record the rollback twice
    rolled = [r for r in history(client, name) if r["alias"] == "champion"][2]
    assert (rolled["version"], rolled["previous"], rolled["source"], rolled["actor"]) == (v1, v2, "vilbert rollback",
                                                                                          "bo")  # fmt: skip
    # a champion without an evaluation is flagged, not reverted
    client.set_registered_model_alias(name, "champion", v3)
    wait_for(lambda: len(history(client, name, HISTORY_TAG)) == 4, "the promotion of version 3")
    assert aliases(client, name)["champion"] == v3
    flagged = json.loads(client.get_model_version(name, v3).tags[VIOLATIONS_TAG])
    assert any("has no evaluation" in f for f in flagged) and any("never passed the gate" in f for f in flagged)
    assert history(client, name, HISTORY_TAG)[-1]["violations"] == flagged
    # a removed champion is recorded and reported
    client.delete_registered_model_alias(name, "champion")
    removed = wait_for(lambda: [r for r in history(client, name) if r["action"] == "deleted" and
                                r["alias"] == "champion"], "the deletion")  # fmt: skip
    assert removed[0]["previous"] == v3 and "resolves to nothing" in removed[0]["violations"][0]


def test_a_worse_or_incomparable_champion_is_flagged(mlflow_server, listener) -> None:
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    name = "events-rules"
    v1, v2 = make_versions(client, name, [50.0, 30.0])
    client.set_model_version_tag(name, v2, "gate.decision", "not_better")
    client.set_registered_model_alias(name, "champion", v1)
    wait_for(lambda: history(client, name, HISTORY_TAG), "the first champion")
    client.set_registered_model_alias(name, "champion", v2)
    wait_for(lambda: len(history(client, name, HISTORY_TAG)) == 2, "the second champion")
    flagged = history(client, name, HISTORY_TAG)[-1]["violations"]
    assert any("the gate did not make version 2 a challenger (not_better" in f for f in flagged)
    assert any("worse than the champion it replaces, version 1 (50)" in f for f in flagged)
