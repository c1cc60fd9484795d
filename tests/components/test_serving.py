"""Serving: request images (base64, paths, file://, s3://), the predictor of every task against a computation by
hand, bad requests, and (slow) ``mlflow models serve`` answering POST /invocations.

The models are the tiny preset (vision target size 64, the demo detector's C) with random weights, saved as a
fine-tuning output per the contract (step.json, final/, answer_vocab.json); their feature store is made by the
real features step with the ``demo`` backend (a detector trained briefly on the tiny world's images), so the
bundled extractor is the real one.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.data.tasks.vqa import AnswerVocab
from components.features.backends import BoxLimits, DemoOptions, decode_rgb
from components.features.store import read_spec
from components.serving.bundle import BundleError
from components.serving.predictor import OUTPUT_COLUMNS, ServingInputError, ViLBertPredictor, image_bytes
from components.sources.synthetic import SyntheticConfig, generate_image
from components.steps.features import FeaturesConfig, run_features
from components.steps.register import RegisterConfig, read_inputs, stage_artifacts
from components.training.launch import free_port
from model import ViLBertForTasks
from model.checkpoint import save_checkpoint
from tests.components.test_data_world import TINY, World, shared_world

CONFIG = TINY.replace(vision=replace(TINY.vision, target_size=64))  # C of the demo detector
ANSWERS = ["yes", "no", "red", "blue", "circle", "square", "2", "3"]
TEXT_LENGTH = {"vqa": 23, "vcr": 40, "refcoco+": 20, "retrieval": 30}
HEADLINE = {"vqa": "vqa_accuracy", "vcr": "vcr_q2a_accuracy", "refcoco+": "grounding_accuracy", "retrieval": "recall@1"}
ROOT = Path(__file__).resolve().parents[2]
_CACHE: dict[str, Path] = {}


def shared_store(world: World, tmp_path_factory) -> Path:
    """A feature store made by the real features step, ``demo`` backend, sized for CONFIG (once per session)."""
    if "store" not in _CACHE:
        out = tmp_path_factory.mktemp("serving_store") / "store"
        demo = DemoOptions(feature_size=CONFIG.vision.feature_size, num_classes=CONFIG.vision.target_size,
                           train_images=12, eval_images=2, epochs=1, batch_images=4)  # fmt: skip
        config = FeaturesConfig(dataset=str(world.root), output=str(out), demo=demo, boxes=BoxLimits(2, 12),
                                limit=3, threads=1, progress=False, batch_size=4, work_dir=str(out.parent / "work"))  # fmt: skip
        run_features(config, log=lambda _m: None)
        _CACHE["store"] = out
    return _CACHE["store"]


def make_model(base: Path, task: str, store: Path, world: World, seed: int = 0) -> Path:
    """A fine-tuning output folder F for ``task`` per DATA_CONTRACTS.md (random weights seeded by ``seed``)."""
    folder = base / f"{task.replace('+', '-plus')}-seed{seed}"
    if (folder / "step.json").exists():
        return folder
    torch.manual_seed(seed)
    model = ViLBertForTasks(CONFIG, num_answers=len(ANSWERS) if task == "vqa" else 1)
    spec = read_spec(store)
    save_checkpoint(model, folder / "final", world.tokenizer, spec.to_dict())
    if task == "vqa":
        AnswerVocab(ANSWERS).save(folder / "answer_vocab.json")
    step = {"step": "finetune", "task": task, "init": "scratch", "init_from": None, "preset": "tiny", "seed": seed,
            "dataset": str(world.root), "features": str(store), "data_hash": "d" * 64,
            "feature_spec_hash": spec.sha256(), "max_text_length": TEXT_LENGTH[task], "tracking_run_id": None,
            "config": {"task": task, "max_regions": 37}}  # fmt: skip
    (folder / "step.json").write_text(json.dumps(step))
    return folder


def make_evaluation(base: Path, task: str, value: float, model: Path, split: str = "val", run_id=None) -> Path:
    """An evaluation folder E (metrics.json per DATA_CONTRACTS.md) with headline ``value``."""
    folder = base / f"eval-{task.replace('+', '-plus')}-{value:g}-{split}-{model.name}"
    folder.mkdir(parents=True, exist_ok=True)
    metric = HEADLINE[task]
    (folder / "metrics.json").write_text(json.dumps({
        "task": task, "split": split, "metric": metric, "value": value, "metrics": {metric: value, "extra": 1.5},
        "num_examples": 12, "init": "scratch", "seed": 0, "model": str(model), "zero_shot": False,
        "tracking_run_id": run_id,
    }))  # fmt: skip
    return folder


def predictor_for(folder: Path, evaluation: Path, staging: Path) -> ViLBertPredictor:
    """The predictor of a staged bundle, in this process (no MLflow)."""
    config = RegisterConfig(model=str(folder), evaluation=str(evaluation))
    step, metrics, checkpoint = read_inputs(config)
    artifacts, _ = stage_artifacts(config, step, metrics, checkpoint, staging)
    return ViLBertPredictor.from_artifacts(artifacts, device="cpu")


def world_png(index: int = 3) -> bytes:
    return generate_image(SyntheticConfig(seed=0, n=24, size=64), index).png


def expected_vqa(folder: Path, store: Path, png: bytes, text: str) -> tuple[str, list[float]]:
    """The VQA answer and sigmoid scores computed by hand from the pieces (not through components.serving.predictor)."""
    from components.data.common import encode_text
    from components.data.regions import region_inputs
    from components.features.backends import open_extractor
    from components.features.spec import RegionFeatures
    from model.checkpoint import load_checkpoint
    from model.tokenizer import load_tokenizer

    rgb = decode_rgb(png)
    found = open_extractor(str(store)).extract([rgb])[0]
    record = RegionFeatures("x", found.boxes.astype(np.float32), found.features.astype(np.float16),
                            found.class_probs.astype(np.float16), rgb.shape[1], rgb.shape[0])  # fmt: skip
    regions = region_inputs(record, 37)
    model = load_checkpoint(folder / "final").eval()
    enc = encode_text(load_tokenizer(folder / "final"), text, TEXT_LENGTH["vqa"])
    with torch.no_grad():
        out = model(enc["input_ids"][None], regions.features[None], regions.boxes[None],
                    token_type_ids=enc["token_type_ids"][None], attention_mask=enc["attention_mask"][None],
                    region_mask=regions.region_mask[None], heads=("answer",))  # fmt: skip
    scores = torch.sigmoid(out.answer_logits[0]).tolist()
    return ANSWERS[int(np.argmax(scores))], scores


@dataclass
class Setup:
    world: World
    store: Path
    base: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    world = shared_world(tmp_path_factory)
    return Setup(world, shared_store(world, tmp_path_factory), tmp_path_factory.mktemp("serving_models"))


@dataclass
class Registered:
    """A registry built once per session: v1 (seed 0, 40.0) challenger -> promoted to champion by hand (CLI),
    v2 (seed 0, 40.0: a tie, via the CLI) not better, v3 (seed 1, 45.0) challenger."""

    uri: str
    name: str
    results: dict[str, dict]
    parent_run_id: str
    store: Path
    folders: dict[str, Path]
    dvc_lock: Path
    question: str = "what colour is the circle?"

    def expected(self, version: str) -> tuple[str, list[float]]:
        return expected_vqa(self.folders[version], self.store, world_png(), self.question)


def shared_registry(tmp_path_factory) -> Registered:
    if "registry" in _REGISTRY:
        return _REGISTRY["registry"]
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from components.cli import app
    from components.steps.register import register_model

    world = shared_world(tmp_path_factory)
    store = shared_store(world, tmp_path_factory)
    base = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(uri)
    pipeline = client.create_experiment("pipeline", artifact_location=str(base / "mlruns" / "pipeline"))
    parent = client.create_run(pipeline, run_name="pipeline").info.run_id
    first, second = make_model(base, "vqa", store, world, seed=0), make_model(base, "vqa", store, world, seed=1)
    lock = base / "dvc.lock"
    lock.write_text(json.dumps({"schema": "2.0", "stages": {
        "features": {"cmd": "vilbert features", "outs": [{"path": os.path.relpath(store, base), "hash": "md5",
                                                          "md5": "f" * 32 + ".dir"}]},
        "finetune": {"cmd": "vilbert finetune", "outs": [{"path": os.path.relpath(first, base), "hash": "md5",
                                                          "md5": "a" * 32 + ".dir"}]},
    }}))  # fmt: skip

    def register(folder: Path, value: float) -> dict:
        config = RegisterConfig(model=str(folder), evaluation=str(make_evaluation(base, "vqa", value, folder, run_id="e1")),
                                tracking_uri=uri, pipeline_run=parent, dvc_lock=str(lock))  # fmt: skip
        result = register_model(config, log=lambda _m: None).to_dict()
        return {**result, "aliases_after": dict(result["aliases"])}

    def cli(*args: str) -> dict:
        out = CliRunner().invoke(app, [*args, "--tracking-uri", uri], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        start = out.output.rfind("\n{\n") + 1  # the summary JSON; MLflow logs its own lines around it
        return json.JSONDecoder().raw_decode(out.output, start)[0]

    results = {"1": register(first, 40.0)}
    results["promote"] = cli("promote", "--name", "vilbert-vqa", "--reason", "first model, checked by hand",
                             "--actor", "tester")  # fmt: skip
    evaluation = make_evaluation(base, "vqa", 40.0, first, run_id="e2")
    written = base / "registrations" / "vqa.json"
    results["2"] = cli("register", "--model", str(first), "--evaluation", str(evaluation), "--dvc-lock", str(lock),
                       "--output", str(written))  # fmt: skip
    results["2-file"] = json.loads(written.read_text())
    results["3"] = register(second, 45.0)
    _REGISTRY["registry"] = Registered(uri, "vilbert-vqa", results, parent, store, {"1": first, "3": second}, lock)
    return _REGISTRY["registry"]


_REGISTRY: dict[str, Registered] = {}


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Registered:
    return shared_registry(tmp_path_factory)


# --- request images -----------------------------------------------------------------------------------------


def test_images_come_as_base64_data_uris_paths_file_uris_or_s3(tmp_path, s3_bucket, monkeypatch) -> None:
    from components import storage

    png = world_png()
    path = tmp_path / "my image.png"
    path.write_bytes(png)
    encoded = base64.b64encode(png).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # as the `base64` tool writes it
    storage.write_bytes(f"{s3_bucket}/img.png", png)
    for value in (
        encoded,
        wrapped,
        f"data:image/png;base64,{encoded}",
        str(path),
        path.as_uri(),
        f"{s3_bucket}/img.png",
    ):
        assert image_bytes(value) == png, value[:40]
    for value, message in [
        ("http://example.com/x.png", "never downloads"),
        ("ftp://host/x.png", "unsupported image URI scheme 'ftp'"),
        (str(tmp_path / "missing.png"), "neither an existing file nor valid base64"),
        ((tmp_path / "missing.png").as_uri(), "not found"),
        (f"{s3_bucket}/missing.png", "not found"),
        ("data:image/png,rawbytes", "must be base64"),
        ("", "non-empty string"),
        (None, "non-empty string"),
    ]:
        with pytest.raises(ServingInputError, match=message):
            image_bytes(value)
    monkeypatch.setenv("VILBERT_SERVING_LOCAL_FILES", "0")  # a server that must not read its own files
    with pytest.raises(ServingInputError, match="does not read local files"):
        image_bytes(path.as_uri())
    with pytest.raises(ServingInputError, match="neither an existing file nor valid base64"):
        image_bytes(str(path))
    assert image_bytes(encoded) == png


# --- the predictor, every task ------------------------------------------------------------------------------


def test_vqa_predictor_matches_the_computation_by_hand(setup: Setup, tmp_path) -> None:
    folder = make_model(setup.base, "vqa", setup.store, setup.world)
    predictor = predictor_for(folder, make_evaluation(setup.base, "vqa", 50.0, folder), tmp_path)
    png, text = world_png(), "what colour is the circle?"
    answer, scores = expected_vqa(folder, setup.store, png, text)
    frame = pd.DataFrame({"image": [base64.b64encode(png).decode(), base64.b64encode(world_png(5)).decode()],
                          "text": [text, "is there a square?"]})  # fmt: skip
    got = predictor.predict(frame)
    assert list(got.columns) == list(OUTPUT_COLUMNS["vqa"]) and len(got) == 2
    assert got.loc[0, "answer"] == answer
    assert got.loc[0, "score"] == pytest.approx(max(scores), abs=1e-5)
    order = sorted(range(len(ANSWERS)), key=lambda i: -scores[i])[:5]
    assert got.loc[0, "top_answers"] == [ANSWERS[i] for i in order]
    assert got.loc[0, "top_scores"] == pytest.approx([scores[i] for i in order], abs=1e-5)
    # a batch answers each row as it would alone
    alone = predictor.predict(frame.iloc[[1]].reset_index(drop=True))
    assert alone.loc[0, "top_scores"] == pytest.approx(got.loc[1, "top_scores"], abs=1e-5)


def test_every_task_answers_in_its_own_shape(setup: Setup, tmp_path) -> None:
    png = world_png()
    image = base64.b64encode(png).decode()
    height, width = decode_rgb(png).shape[:2]
    results = {}
    for task in ("vcr", "refcoco+", "retrieval"):
        folder = make_model(setup.base, task, setup.store, setup.world)
        predictor = predictor_for(folder, make_evaluation(setup.base, task, 10.0, folder), tmp_path / task)
        row = {"image": image, "text": "the red circle"}
        if task == "vcr":
            row["choices"] = ["a circle", "a square", "a star", "nothing"]
        got = predictor.predict(pd.DataFrame([row, row]))
        assert list(got.columns) == list(OUTPUT_COLUMNS[task]) and len(got) == 2
        results[task] = got.iloc[0]
    vcr = results["vcr"]
    assert sum(vcr["scores"]) == pytest.approx(1.0, abs=1e-5) and vcr["score"] == max(vcr["scores"])
    assert vcr["answer"] == ["a circle", "a square", "a star", "nothing"][vcr["choice"]]
    box = results["refcoco+"]["box"]
    assert len(box) == 4 and 0 <= box[0] <= box[2] <= width and 0 <= box[1] <= box[3] <= height
    assert results["refcoco+"]["region"] >= 1 and 0 < results["refcoco+"]["score"] <= 1  # never the whole image
    assert np.isfinite(results["retrieval"]["score"])


def test_bad_requests_get_errors_naming_the_row(setup: Setup, tmp_path) -> None:
    vqa = make_model(setup.base, "vqa", setup.store, setup.world)
    predictor = predictor_for(vqa, make_evaluation(setup.base, "vqa", 50.0, vqa), tmp_path / "vqa")
    good = base64.b64encode(world_png()).decode()
    cases = [
        (pd.DataFrame({"image": [good]}), r"lacks the column\(s\) \['text'\]"),
        (pd.DataFrame({"image": [good, "bm90IGFuIGltYWdl"], "text": ["q", "q"]}), "row 1: image cannot be decoded"),
        (pd.DataFrame({"image": [good, good], "text": ["q", "  "]}), "row 1: text must be a non-empty string"),
        (pd.DataFrame({"image": ["https://x/y.png"], "text": ["q"]}), "row 0: http"),
    ]
    for frame, message in cases:
        with pytest.raises(ServingInputError, match=message):
            predictor.predict(frame)
    vcr = make_model(setup.base, "vcr", setup.store, setup.world)
    predictor = predictor_for(vcr, make_evaluation(setup.base, "vcr", 10.0, vcr), tmp_path / "vcr")
    with pytest.raises(ServingInputError, match="row 0: choices must be a list of 4"):
        predictor.predict(pd.DataFrame({"image": [good], "text": ["q"], "choices": [["a", "b"]]}))


def test_an_s3_store_bundles_its_extractor(setup: Setup, s3_bucket, tmp_path) -> None:
    """A store on S3 (as a features run with an s3:// output leaves it: weights_uri names the S3 detector folder)."""
    from components import storage
    from components.features.backends import open_extractor
    from components.serving.bundle import load_bundled_extractor, stage_extractor

    uri = f"{s3_bucket}/store"
    storage.sync_up(setup.store, uri)
    described = json.loads((setup.store / "extractor.json").read_text())
    described["prepared"]["weights_uri"] = f"{uri}/demo_detector"
    storage.write_bytes(f"{uri}/extractor.json", json.dumps(described).encode())
    spec = stage_extractor(uri, tmp_path / "bundle")
    assert sorted(p.name for p in (tmp_path / "bundle" / "weights").iterdir()) == ["config.json", "model.safetensors"]
    extractor, feature_spec = load_bundled_extractor(tmp_path / "bundle")
    assert feature_spec.to_dict() == spec == read_spec(setup.store).to_dict()
    image = decode_rgb(world_png())
    np.testing.assert_array_equal(extractor.extract([image])[0].features,
                                  open_extractor(str(setup.store)).extract([image])[0].features)  # fmt: skip
    storage.delete(f"{uri}/extractor.json")
    with pytest.raises(BundleError, match="has no extractor.json"):
        stage_extractor(uri, tmp_path / "again")


@pytest.mark.slow
def test_a_detector_store_bundles_the_user_weights(setup: Setup, tmp_path) -> None:
    """A ``detector`` (Faster R-CNN, RANDOM weights) store: the weights are copied into the bundle, which then
    extracts without the original file, the same features the store holds."""
    from safetensors.torch import save_file
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from components.features import FeatureStore
    from components.features.backends import DetectorOptions
    from components.serving.bundle import load_bundled_extractor, stage_extractor

    torch.manual_seed(0)
    state = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).state_dict()
    weights = tmp_path / "user" / "detector.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    store = tmp_path / "store"
    detector = DetectorOptions(weights=str(weights), min_size=96, max_size=128, proposals=20)
    run_features(FeaturesConfig(dataset=str(setup.world.root), output=str(store), backend="detector", detector=detector,
                                boxes=BoxLimits(2, 6), limit=1, progress=False, work_dir=str(tmp_path / "w")),
                 log=lambda _m: None)  # fmt: skip
    staged = tmp_path / "bundle"
    spec = stage_extractor(str(store), staged)
    assert (staged / "weights" / "detector.safetensors").read_bytes() == weights.read_bytes()
    weights.unlink()  # serving must not need the user's file any more
    extractor, feature_spec = load_bundled_extractor(staged)
    assert feature_spec.to_dict() == spec and spec["backend"] == "detector"
    stored = FeatureStore.open(store)
    image_id = stored.image_ids()[0]
    path = setup.world.root / "images" / f"{image_id}.png"
    again = extractor.extract([decode_rgb(path.read_bytes())])[0]
    record = stored.get(image_id)
    np.testing.assert_allclose(again.boxes, record.boxes, atol=1e-3)
    np.testing.assert_allclose(again.features.astype(np.float16), record.features, atol=1e-2)


# --- mlflow models serve ------------------------------------------------------------------------------------


def serving_env(tracking_uri: str) -> dict[str, str]:
    """The environment of a clean process: this venv's bin first on PATH, the test store, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VILBERT_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    return env


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registered, tmp_path) -> None:
    """``mlflow models serve -m models:/vilbert-vqa@champion --env-manager local`` answers an image and a question."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{registered.name}@champion",
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(cmd, cwd=tmp_path, env=serving_env(registered.uri), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (
                "server did not come up: " + (tmp_path / "serve.log").read_text()[-3000:]
            )
            time.sleep(1)
        png = world_png()
        body = {"dataframe_split": {"columns": ["image", "text"],
                                    "data": [[base64.b64encode(png).decode(), registered.question]]}}  # fmt: skip
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())["predictions"][0]
        expected, scores = registered.expected("1")  # the champion
        assert answer["answer"] == expected and answer["score"] == pytest.approx(max(scores), abs=1e-5)
        bad = {"dataframe_records": [{"image": "bm90IGFuIGltYWdl", "text": "q"}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(bad).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == 400 and "row 0: image cannot be decoded" in error.value.read().decode()
    finally:
        os.killpg(server.pid, 15)  # the server and its uvicorn worker: the process group this test started
        server.wait(timeout=30)
        log.close()
