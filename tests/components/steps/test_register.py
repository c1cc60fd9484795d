"""The registry: the gate (first, beats, tie, worse, not comparable), promotion and rollback with their audit tags,
lineage tags, clear errors, and (slow) loading a registered model in a clean process.

The registry itself is built once (``shared_registry`` in test_serving.py): three real registrations of tiny VQA
models into a temporary sqlite store, one promotion and one registration through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.cli import app
from components.registry.rules import HISTORY_TAG
from components.serving.bundle import BundleError
from components.steps.register import (
    RegisterConfig,
    RegistryError,
    VersionMetric,
    default_model_name,
    dvc_lineage,
    gate,
    promote,
    register_model,
    rollback,
)
from tests.components.test_serving import (
    Registered,
    make_evaluation,
    make_model,
    serving_env,
    shared_registry,
    shared_store,
    world_png,
)


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Registered:
    return shared_registry(tmp_path_factory)


# --- the gate rule ------------------------------------------------------------------------------------------


def ref(version: str, value: float | None, metric: str = "vqa_accuracy", split: str = "val") -> VersionMetric:
    return VersionMetric(version, metric, split, value)


@pytest.mark.parametrize(
    ("value", "champion", "challenger", "min_delta", "decision"),
    [
        (10.0, None, None, 0.0, "challenger"),  # the first version ever
        (50.0, ref("1", 40.0), None, 0.0, "challenger"),  # beats the champion
        (40.0, ref("1", 40.0), None, 0.0, "not_better"),  # a tie does not beat
        (30.0, ref("1", 40.0), None, 0.0, "not_better"),  # worse
        (40.5, ref("1", 40.0), None, 1.0, "not_better"),  # not by more than min_delta
        (41.5, ref("1", 40.0), None, 1.0, "challenger"),
        (45.0, ref("1", 40.0), ref("2", 48.0), 0.0, "not_better"),  # a better challenger keeps its alias
        (49.0, ref("1", 40.0), ref("2", 48.0), 0.0, "challenger"),
        (45.0, ref("1", 40.0), ref("1", 40.0), 0.0, "challenger"),  # both aliases on one version
        (30.0, None, ref("2", 20.0), 0.0, "challenger"),  # no champion yet: beat the waiting challenger
        (50.0, ref("1", 40.0, split="test"), None, 0.0, "not_comparable"),
        (50.0, ref("1", 40.0, metric="recall@1"), None, 0.0, "not_comparable"),
        (50.0, ref("1", None), None, 0.0, "not_comparable"),  # a champion without a recorded metric
    ],
)
def test_gate_rule(value, champion, challenger, min_delta, decision) -> None:
    verdict = gate("vqa_accuracy", "val", value, champion, challenger, min_delta)
    assert verdict.decision == decision, verdict.reason
    tags = verdict.tags()
    assert tags["gate.decision"] == decision and tags["gate.champion_version"] == (
        champion.version if champion else "none"
    )


def test_model_names_per_task() -> None:
    assert default_model_name("refcoco+") == "vilbert-refcoco-plus" and default_model_name("vqa") == "vilbert-vqa"
    with pytest.raises(RegistryError, match="unknown task 'gqa'"):
        default_model_name("gqa")


# --- registrations (real MLflow, sqlite) --------------------------------------------------------------------


def test_first_version_is_challenger_and_only_a_person_makes_it_champion(registered: Registered) -> None:
    first = registered.results["1"]
    assert first["version"] == "1" and first["decision"] == "challenger"
    assert first["aliases_after"] == {"challenger": "1"}  # register never moves champion
    promotion = registered.results["promote"]
    assert promotion["champion"] == "1" and promotion["replaced"] is None and promotion["actor"] == "tester"
    client = MlflowClient(registered.uri)
    tags = client.get_model_version(registered.name, "1").tags
    assert (
        tags["champion.promoted_by"] == "tester" and tags["champion.promotion_reason"] == "first model, checked by hand"
    )
    assert tags["champion.promoted_at"] == promotion["at"] and promotion["at"].endswith("+00:00")
    history = json.loads(client.get_registered_model(registered.name).tags[HISTORY_TAG])
    assert [(e["action"], e["champion"]) for e in history] == [("promote", "1")]


def test_a_tie_does_not_beat_and_a_better_version_becomes_challenger(registered: Registered) -> None:
    tie, better = registered.results["2"], registered.results["3"]
    written = registered.results["2-file"]  # vilbert register --output: the whole result, tags included
    assert written["version"] == "2" and written["tags"]["gate.decision"] == "not_better"
    assert tie["decision"] == "not_better" and "does not beat the champion's 40" in tie["reason"]
    assert tie["aliases"] == {"champion": "1"}
    assert better["decision"] == "challenger" and better["aliases"] == {"champion": "1", "challenger": "3"}
    tags = MlflowClient(registered.uri).get_model_version(registered.name, "2").tags
    assert tags["gate.decision"] == "not_better" and tags["gate.champion_version"] == "1"
    assert float(tags["gate.champion_value"]) == 40.0


def test_versions_carry_lineage_and_metrics(registered: Registered, monkeypatch) -> None:
    from components.features.store import read_spec

    client = MlflowClient(registered.uri)
    version = client.get_model_version(registered.name, "1")
    tags = version.tags
    assert tags["metric.name"] == "vqa_accuracy" and float(tags["metric.value"]) == 40.0 and tags["eval.split"] == "val"
    assert float(tags["eval.extra"]) == 1.5 and tags["task"] == "vqa"
    assert (
        tags["lineage.data_hash"] == "d" * 64
        and tags["lineage.feature_spec_hash"] == read_spec(registered.store).sha256()
    )
    assert tags["lineage.dvc.features"] == "f" * 32 + ".dir" and tags["lineage.dvc.features_out"].startswith(
        "features:"
    )
    assert tags["lineage.dvc.model"] == "a" * 32 + ".dir"  # the finetune out holds the model folder
    assert tags["lineage.pipeline_run_id"] == registered.parent_run_id and tags["lineage.evaluation_run_id"] == "e1"
    assert len(tags["lineage.checkpoint_hash"]) == 64
    assert len(tags.get("lineage.git_commit", "x" * 40)) == 40
    run = client.get_run(tags["lineage.register_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == registered.parent_run_id and run.info.status == "FINISHED"
    assert run.data.metrics["vqa_accuracy"] == 40.0
    # the model carries its bundle: checkpoint, extractor, task settings, the project code, a signature
    from mlflow.models import Model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    info = Model.load(f"models:/{registered.name}/1")
    assert info.signature.inputs.input_names() == ["image", "text"]
    assert set(info.flavors["python_function"]["artifacts"]) == {"checkpoint", "extractor", "task"}
    assert info.flavors["python_function"]["code"] == "code"


def test_promote_and_rollback_move_champion_and_record_who_when_why(registered: Registered, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)  # MLflow resolves a models:/ source through it
    client = MlflowClient(registered.uri)
    name = "vilbert-alias-test"
    client.create_registered_model(name)
    source = client.get_model_version(registered.name, "1").source
    for _ in range(3):
        client.create_model_version(name, source)
    client.set_registered_model_alias(name, "challenger", "2")
    first = promote(name, "first", version="1", actor="ann", tracking_uri=registered.uri)
    second = promote(name, "better on val", actor="bob", tracking_uri=registered.uri)  # the challenger, v2
    assert (first.champion, first.replaced, second.champion, second.replaced) == ("1", None, "2", "1")
    assert client.get_registered_model(name).aliases == {"champion": 2, "previous-champion": 1}
    assert client.get_model_version(name, "1").tags["champion.demotion_reason"] == "better on val"
    back = rollback(name, "v2 answers badly", actor="cy", tracking_uri=registered.uri)
    assert (back.champion, back.replaced, back.actor) == ("1", "2", "cy")
    assert client.get_registered_model(name).aliases == {"champion": 1}
    v2 = client.get_model_version(name, "2").tags
    assert v2["champion.rollback_reason"] == "v2 answers badly" and v2["champion.rolled_back_by"] == "cy"
    assert client.get_model_version(name, "1").tags["champion.restored_by"] == "cy"
    history = json.loads(client.get_registered_model(name).tags[HISTORY_TAG])
    assert [(e["action"], e["champion"], e["actor"]) for e in history] == [
        ("promote", "1", "ann"), ("promote", "2", "bob"), ("rollback", "1", "cy")]  # fmt: skip
    out = CliRunner().invoke(app, ["rollback", "--name", name, "--reason", "again", "--tracking-uri", registered.uri])
    assert out.exit_code == 1 and "no 'previous-champion' alias" in out.output


def test_unknown_models_versions_and_aliases_are_clear_errors(registered: Registered) -> None:
    uri = registered.uri
    with pytest.raises(RegistryError, match=r"no registered model 'vilbert-gqa' .*registered: \[.*'vilbert-vqa'"):
        promote("vilbert-gqa", "why", tracking_uri=uri)
    with pytest.raises(RegistryError, match=r"has no version '99' \(versions: \['1', '2', '3'\]\)"):
        promote(registered.name, "why", version="99", tracking_uri=uri)
    with pytest.raises(RegistryError, match="already the champion"):
        promote(registered.name, "why", version="1", tracking_uri=uri)
    with pytest.raises(RegistryError, match="needs a reason"):
        promote(registered.name, "  ", tracking_uri=uri)
    with pytest.raises(RegistryError, match="no 'previous-champion' alias"):
        rollback(registered.name, "why", tracking_uri=uri)
    out = CliRunner().invoke(app, ["promote", "--name", "nope", "--reason", "x", "--tracking-uri", uri])
    assert out.exit_code == 1 and "no registered model 'nope'" in out.output


def test_register_refuses_what_it_cannot_serve(registered: Registered, tmp_path_factory) -> None:
    from tests.components.test_data_world import shared_world

    world = shared_world(tmp_path_factory)
    base = tmp_path_factory.mktemp("refused")
    store = shared_store(world, tmp_path_factory)
    folder = make_model(base, "vqa", store, world)
    evaluation = make_evaluation(base, "vqa", 1.0, folder)

    def attempt(**kw):
        return register_model(RegisterConfig(**{"model": str(folder), "evaluation": str(evaluation),
                                                "tracking_uri": registered.uri, **kw}), log=lambda _m: None)  # fmt: skip

    with pytest.raises(BundleError, match="has no extractor.json"):
        attempt(features=str(world.store))  # features written without an extractor (as imports are)
    with pytest.raises(RegistryError, match="the evaluation is of 'vcr'"):
        attempt(evaluation=str(make_evaluation(base, "vcr", 1.0, folder)))
    with pytest.raises(RegistryError, match="no metrics.json"):
        attempt(evaluation=str(base / "nowhere"))
    (folder / "answer_vocab.json").rename(folder / "answers.bak")
    try:
        with pytest.raises(RegistryError, match="has no answer_vocab.json"):
            attempt()
    finally:
        (folder / "answers.bak").rename(folder / "answer_vocab.json")
    assert [v.version for v in MlflowClient(registered.uri).search_model_versions("name='vilbert-vqa'")] != []
    assert len(MlflowClient(registered.uri).search_model_versions("name='vilbert-vqa'")) == 3  # nothing registered


def test_every_tag_and_metric_name_is_one_mlflow_accepts(registered: Registered, tmp_path_factory) -> None:
    """Retrieval's ``recall@1`` becomes ``eval.recall_at_1`` (MLflow refuses ``@`` in tag and metric names)."""
    from mlflow.utils.validation import validate_param_and_metric_name

    from components.registry.lineage import eval_metrics, version_tags
    from components.steps.register import read_inputs
    from tests.components.test_data_world import shared_world

    world = shared_world(tmp_path_factory)
    base = tmp_path_factory.mktemp("names")
    folder = make_model(base, "retrieval", registered.store, world)
    config = RegisterConfig(model=str(folder), evaluation=str(make_evaluation(base, "retrieval", 12.0, folder)))
    step, metrics, checkpoint = read_inputs(config)
    metrics["metrics"].update({"recall@5": 30.0, "recall@10": 41.0})
    tags = version_tags(config, step, metrics, checkpoint, "s" * 64, None, "run")
    assert tags["metric.name"] == "recall@1" and tags["eval.recall_at_5"] == "30.0"
    assert eval_metrics(metrics)["eval.recall_at_10"] == 41.0
    bad = [k for k in [*tags, *eval_metrics(metrics)] if not validate_param_and_metric_name(k)]
    assert not bad, bad


def test_dvc_lineage_matches_the_out_holding_each_path(tmp_path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    outs:\n    - path: data\n      md5: d1.dir\n"
        "  features:\n    cmd: y\n    outs:\n    - path: data/features\n      md5: f1.dir\n"
    )
    tags = dvc_lineage(lock, {"dataset": str(tmp_path / "data" / "world"), "features": str(tmp_path / "data/features"),
                              "model": str(tmp_path / "elsewhere"), "evaluation": "s3://bucket/eval"})  # fmt: skip
    assert tags == {"lineage.dvc.dataset": "d1.dir", "lineage.dvc.dataset_out": "ingest:data",
                    "lineage.dvc.features": "f1.dir", "lineage.dvc.features_out": "features:data/features"}  # fmt: skip
    lock.write_text("{not yaml: [")
    assert dvc_lineage(lock, {"dataset": str(tmp_path / "data")}) == {}


# --- a clean process ----------------------------------------------------------------------------------------

CLEAN = """
import base64, json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
png = open(sys.argv[2], "rb").read()
frame = pd.DataFrame({"image": [base64.b64encode(png).decode(), sys.argv[2]], "text": [sys.argv[3]] * 2})
out = model.predict(frame)
import components
print(json.dumps({"answers": out["answer"].tolist(), "scores": out["top_scores"].tolist(),
                  "components": components.__file__}))
"""


@pytest.mark.slow
def test_the_challenger_loads_and_answers_in_a_clean_process(registered: Registered, tmp_path) -> None:
    """A new interpreter (outside the checkout, only MLFLOW_TRACKING_URI set) loads models:/vilbert-vqa@challenger;
    the project code comes from the model's own code/ folder."""
    image = tmp_path / "question.png"
    image.write_bytes(world_png())
    done = subprocess.run(
        [sys.executable, "-c", CLEAN, f"models:/{registered.name}@challenger", str(image), registered.question],
        cwd=tmp_path, env=serving_env(registered.uri), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    answer, scores = registered.expected("3")  # the challenger is version 3 (seed 1)
    assert got["answers"] == [answer, answer]
    assert got["scores"][0] == pytest.approx(sorted(scores, reverse=True)[:5], abs=1e-5)
    assert got["scores"][1] == pytest.approx(got["scores"][0], abs=1e-6)  # base64 and a path: the same image
    assert Path(got["components"]).parts[-3:] == ("code", "components", "__init__.py")
    assert not Path(got["components"]).is_relative_to(Path(__file__).resolve().parents[3]), got["components"]
