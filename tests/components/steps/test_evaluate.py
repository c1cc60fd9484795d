"""The evaluate step end to end on the tiny world: per task, metrics.json equals the official metric functions applied
to the model's predictions computed here independently (one example at a time, straight from the task files);
zero-shot retrieval; pictures; MLflow; S3 output; bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components import storage
from components.data.common import DataError, EmptySplitError, MissingFeaturesError, encode_text
from components.data.tasks import AnswerVocab, TaskFiles
from components.evaluation import Predictions, mlflow_metric_name, predict, score
from components.features import FeatureSpecMismatch
from components.metrics import grounding_scores, retrieval_scores, vcr_scores, vqa_scores, xywh_to_xyxy
from components.steps.evaluate import EvaluateConfig, run_evaluate
from components.tracking import PARENT_RUN_ENV
from model import ViLBertForPretraining, ViLBertForTasks
from model.checkpoint import load_checkpoint, save_checkpoint
from tests.components.test_data_world import SPEC, TINY, World, shared_world, write_store

TEXT_LENGTH = {"vqa": 23, "vcr": 40, "refcoco+": 20, "retrieval": 30}
#: metrics.json and predictions.jsonl keys as DATA_CONTRACTS.md lists them.
METRICS_KEYS = {"task", "split", "metric", "value", "metrics", "num_examples", "init", "seed", "model", "zero_shot", "blind",
                "tracking_run_id", "dataset", "validation", "features", "dataset_report", "max_examples", "created_at",
                "seconds"}  # fmt: skip
RECORD_KEYS = {
    "vqa": {"question_id", "image_id", "question", "prediction", "target", "score", "answers", "answer_type",
            "question_type", "accuracy"},
    "vcr": {"annot_id", "image_id", "question", "prediction", "target", "score", "choice_scores", "correct"},
    "refcoco+": {"ref_id", "sent_id", "image_id", "expression", "prediction", "target", "region", "score", "best_iou",
                 "num_candidates", "iou", "correct"},
    "retrieval": {"caption_index", "caption", "image_id", "prediction", "target", "score", "target_score", "top_k",
                  "top_k_scores", "rank"},
}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


@pytest.fixture(autouse=True)
def _no_parent_run(monkeypatch):
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches of one example: on a shared 2-core machine torch's thread pool makes them ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spread(model: torch.nn.Module, seed: int) -> None:
    """Weights larger than the init's std 0.02, so a random model's predictions differ between examples."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def make_model_folder(base: Path, world: World, task: str | None, seed: int = 0) -> Path:
    """A finetune (task) or pretrain (task None) output folder as DATA_CONTRACTS.md specifies it."""
    folder = base / (task or "pretrain").replace("+", "plus")
    torch.manual_seed(seed)
    if task is None:
        model: torch.nn.Module = ViLBertForPretraining(TINY)
    else:
        answers = 1
        if task == "vqa":
            vocab = AnswerVocab.from_task_files(TaskFiles(world.root, world.validation), min_count=2)
            vocab.save(folder / "answer_vocab.json")
            answers = len(vocab)
        model = ViLBertForTasks(TINY, num_answers=answers)
    _spread(model, seed)
    save_checkpoint(model, folder / "final", world.tokenizer, SPEC.to_dict())
    step = {
        "step": "pretrain" if task is None else "finetune", "task": task, "init": "pretrained" if task else "bert",
        "init_from": None, "preset": "tiny", "seed": seed, "dataset": str(world.root),
        "validation": str(world.validation), "features": str(world.store), "data_hash": "d" * 64,
        "feature_spec_hash": SPEC.sha256(), "max_text_length": TEXT_LENGTH[task or "retrieval"],
        "tracking_run_id": None, "config": {"max_regions": 37},
    }  # fmt: skip
    (folder / "step.json").write_text(json.dumps(step))
    return folder


@pytest.fixture(scope="module")
def models(world: World, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {name: make_model_folder(base, world, None if name == "zero-shot" else name, seed=i)
            for i, name in enumerate(("vqa", "vcr", "refcoco+", "retrieval", "zero-shot"))}  # fmt: skip


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def evaluate(model: Path, output: Path | str, **kw) -> tuple:
    kw.setdefault("tracking", False)
    kw.setdefault("threads", 1)
    config = EvaluateConfig(model=str(model), output=str(output), progress=False, system_metrics=False, **kw)
    result = run_evaluate(config)
    if storage.is_s3(str(output)):
        metrics = json.loads(storage.read_bytes(f"{output}/metrics.json"))
        records = [json.loads(line) for line in storage.read_bytes(f"{output}/predictions.jsonl").splitlines()]
    else:
        metrics = json.loads((Path(output) / "metrics.json").read_text())
        records = [json.loads(line) for line in (Path(output) / "predictions.jsonl").read_text().splitlines()]
    assert set(metrics) == METRICS_KEYS and all(set(r) == RECORD_KEYS[result.task] for r in records)
    assert 0 < metrics["metrics"]["chance"] < 100  # every task reports its chance level (percent)
    return result, metrics, records


# --- independent predictions: one example at a time, ground truth read from the task files -------------------


def _forward(model, tokenizer, regions, text: str, image_id: str, length: int, heads, pair: str | None = None):
    enc = encode_text(tokenizer, text, length, pair=pair)
    r = regions[image_id]
    with torch.no_grad():
        return model(enc["input_ids"][None], r.features[None], r.boxes[None], enc["token_type_ids"][None],
                     enc["attention_mask"][None], r.region_mask[None], heads=heads)  # fmt: skip


def _tasks_model(folder: Path) -> ViLBertForTasks:
    header = json.loads((folder / "final/config.json").read_text())
    if header["kind"] == "pretraining":
        return load_checkpoint(folder / "final", kind="tasks", num_answers=1).eval()
    return load_checkpoint(folder / "final").eval()


def _expected_vqa(world: World, folder: Path, records: list[dict]) -> float:
    model, tok, regions = _tasks_model(folder), world.tokenizer, world.regions()
    vocab = AnswerVocab.load(folder / "answer_vocab.json")
    files = TaskFiles(world.root, world.validation)
    questions = {
        q["question_id"]: q for q in files.read_json("tasks/vqa/v2_OpenEnded_mscoco_test_questions.json")["questions"]
    }
    annotations = files.read_json("tasks/vqa/v2_mscoco_test_annotations.json")["annotations"]
    mine = {r["question_id"] for r in records}
    rejected = files.rejected("vqa_questions") | files.rejected("vqa_annotations")
    assert mine == {qid for qid in questions if str(qid) not in rejected}
    preds = {}
    for qid in mine:
        q = questions[qid]
        out = _forward(model, tok, regions, q["question"], files.image_id(q["image_id"]), 23, ("answer",))
        preds[qid] = vocab[int(out.answer_logits.argmax())]
    assert {r["question_id"]: r["prediction"] for r in records} == preds
    return vqa_scores(preds, [a for a in annotations if a["question_id"] in mine])["accuracy"]


def _expected_vcr(world: World, folder: Path, records: list[dict]) -> float:
    model, tok, regions = _tasks_model(folder), world.tokenizer, world.regions()
    files = TaskFiles(world.root, world.validation)
    rows = {r["annot_id"]: r for _, r in files.read_jsonl("tasks/vcr/test.jsonl")}
    scores, labels = [], []
    for rec in records:
        row = rows[rec["annot_id"]]
        image = files.image_id(row.get("img_fn"), row.get("img_id"))
        logits = [float(_forward(model, tok, regions, row["question"], image, 40, ("pair",), pair=answer).pair_logit)
                  for answer in row["answer_choices"]]  # fmt: skip
        scores.append(logits)
        labels.append(row["answer_label"])
        assert rec["prediction"] == int(np.argmax(logits)) and rec["target"] == row["answer_label"]
    assert len(records) == len(rows)
    return vcr_scores(scores, labels)["accuracy"]


def _expected_grounding(world: World, folder: Path, records: list[dict]) -> float:
    model, tok, regions = _tasks_model(folder), world.tokenizer, world.regions()
    files = TaskFiles(world.root, world.validation)
    refs = {r["ref_id"]: r for r in files.read_json("tasks/refcoco+/refs(unc).json")}
    boxes = {a["id"]: a["bbox"] for a in files.read_json("tasks/refcoco+/instances.json")["annotations"]}
    preds, truths = [], []
    for rec in records:
        ref = refs[rec["ref_id"]]
        sent = next(s for s in ref["sentences"] if s["sent_id"] == rec["sent_id"])
        image = files.image_id(ref["image_id"])
        logits = _forward(model, tok, regions, sent["raw"], image, 20, ("region",)).region_logits[0, 1:, 0]
        preds.append(regions[image].pixel_boxes[1 + int(logits.argmax())].tolist())
        truths.append(xywh_to_xyxy(boxes[ref["ann_id"]]).tolist())
    np.testing.assert_allclose([r["prediction"] for r in records], preds)
    assert len(records) == sum(len(r["sentences"]) for r in refs.values() if r["split"] == "test")
    return grounding_scores(preds, truths)["accuracy"]


def _expected_retrieval(world: World, folder: Path, zero_shot: bool) -> dict:
    model, tok, regions = _tasks_model(folder), world.tokenizer, world.regions()
    files = TaskFiles(world.root, world.validation)
    entries = [e for e in files.read_json("tasks/flickr30k/dataset_flickr30k.json")["images"] if e["split"] == "test"]
    images = [files.image_id(e["filename"]) for e in entries]
    captions = [(s["raw"], i) for i, e in enumerate(entries) for s in e["sentences"]]
    matrix = np.zeros((len(captions), len(images)))
    for c, (text, _) in enumerate(captions):
        for i, image in enumerate(images):
            out = _forward(model, tok, regions, text, image, 30, ("alignment",) if zero_shot else ("pair",))
            matrix[c, i] = float(out.alignment_logits.softmax(-1)[0, 0]) if zero_shot else float(out.pair_logit)
    return retrieval_scores(matrix, [i for _, i in captions])


# --- per task -----------------------------------------------------------------------------------------------


def _pngs(folder: Path) -> list[str]:
    names = sorted(p.name for p in (folder / "pictures").glob("*.png"))
    for name in names:
        with Image.open(folder / "pictures" / name) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    return names


@pytest.mark.slow  # MLflow: importing it and creating the sqlite tables take ~10 s here
def test_vqa_end_to_end_with_mlflow(world: World, models, tmp_path, sqlite_uri) -> None:
    result, metrics, records = evaluate(
        models["vqa"], tmp_path / "e", pictures=1, tracking=True, tracking_uri=sqlite_uri
    )
    expected = _expected_vqa(world, models["vqa"], records)
    assert metrics["metric"] == "vqa_accuracy" and metrics["value"] == pytest.approx(100 * expected)
    assert metrics["metrics"]["vqa_accuracy"] == result.value == pytest.approx(100 * expected)
    assert 0 < expected < 1, "a random model that is always right or always wrong tests little"
    assert {"vqa_accuracy_yes_no", "vqa_accuracy_number", "vqa_accuracy_other"} <= set(metrics["metrics"])
    assert metrics["num_examples"] == len(records) and metrics["split"] == "test" and metrics["zero_shot"] is False
    assert metrics["dataset_report"]["rows"] == metrics["dataset_report"]["kept"] + sum(
        metrics["dataset_report"]["dropped"].values())  # fmt: skip
    assert all(0 <= r["score"] <= 1 and 0 <= r["accuracy"] <= 1 for r in records)
    names = _pngs(tmp_path / "e")
    assert {"answer_distribution.png", "coattention_00.png", "region_attention_00.png"} <= set(names)
    assert not list((tmp_path / "e").glob(".evaluate-*"))  # the staging folder is gone

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri)
    run = client.get_run(metrics["tracking_run_id"])
    assert run.info.run_name == "evaluate-vqa" and run.info.status == "FINISHED"
    assert run.data.metrics["vqa_accuracy"] == pytest.approx(metrics["value"])
    tags = run.data.tags
    assert tags["lineage.data_hash"] == "d" * 64 and tags["lineage.feature_spec_hash"] == SPEC.sha256()
    assert tags["lineage.model"] == str(models["vqa"].resolve()) and len(tags["lineage.checkpoint_hash"]) == 64
    assert (tags["task"], tags["split"], tags["init"], tags["seed"]) == ("vqa", "test", "pretrained", "0")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "predictions.jsonl", "pictures"} <= artifacts
    assert {f"pictures/{n}" for n in names} == {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}


def test_vcr_end_to_end_and_a_rerun_replaces_the_pictures(world: World, models, tmp_path) -> None:
    result, metrics, records = evaluate(models["vcr"], tmp_path / "e", batch_size=2, pictures=1)
    assert metrics["metric"] == "vcr_q2a_accuracy"
    assert metrics["value"] == pytest.approx(100 * _expected_vcr(world, models["vcr"], records))
    assert result.tracking_run_id is None and metrics["tracking_run_id"] is None
    assert "answer_distribution.png" in _pngs(tmp_path / "e")
    (tmp_path / "e" / "pictures" / "old.png").write_bytes(b"stale")
    _, again, _ = evaluate(models["vcr"], tmp_path / "e", pictures=0, max_examples=2)
    assert again["num_examples"] == 2 and _pngs(tmp_path / "e") == []  # no stale picture survives a rerun


def test_refcoco_end_to_end(world: World, models, tmp_path) -> None:
    _, metrics, records = evaluate(models["refcoco+"], tmp_path / "e", batch_size=3, pictures=3)
    assert metrics["metric"] == "grounding_accuracy"
    assert metrics["value"] == pytest.approx(100 * _expected_grounding(world, models["refcoco+"], records))
    assert metrics["metrics"]["grounding_upper_bound"] == 100.0  # the world's store holds every object's box
    assert 0 <= metrics["metrics"]["mean_iou"] <= 1
    assert all(r["correct"] == (r["iou"] >= 0.5) for r in records)
    assert {"grounding_examples.png", "coattention_01.png", "region_attention_01.png"} <= set(_pngs(tmp_path / "e"))


def test_retrieval_end_to_end(world: World, models, tmp_path) -> None:
    _, metrics, records = evaluate(models["retrieval"], tmp_path / "e", batch_size=2, pictures=1)
    expected = _expected_retrieval(world, models["retrieval"], zero_shot=False)
    got = metrics["metrics"]
    assert metrics["metric"] == "recall@1" and metrics["value"] == pytest.approx(
        100 * expected["image_retrieval"]["recall_at_1"]
    )
    for k in (1, 5, 10):
        assert got[f"recall@{k}"] == pytest.approx(100 * expected["image_retrieval"][f"recall_at_{k}"])
        assert got[f"text_recall@{k}"] == pytest.approx(100 * expected["text_retrieval"][f"recall_at_{k}"])
    assert got["median_rank"] == expected["image_retrieval"]["median_rank"]
    assert [r["rank"] for r in records] == expected["image_retrieval"]["ranks"]
    assert metrics["num_examples"] == expected["num_captions"] == len(records)
    assert "retrieval_examples.png" in _pngs(tmp_path / "e")


def test_zero_shot_retrieval_on_a_pretraining_checkpoint(world: World, models, tmp_path) -> None:
    with pytest.raises(DataError, match="pretraining output without a task head.*zero_shot=True"):
        evaluate(models["zero-shot"], tmp_path / "refused")
    result, metrics, records = evaluate(models["zero-shot"], tmp_path / "e", zero_shot=True, pictures=0)
    expected = _expected_retrieval(world, models["zero-shot"], zero_shot=True)
    assert metrics["zero_shot"] is True and result.task == "retrieval"
    assert metrics["value"] == pytest.approx(100 * expected["image_retrieval"]["recall_at_1"])
    assert [r["rank"] for r in records] == expected["image_retrieval"]["ranks"]
    assert all(0 <= r["score"] <= 1 for r in records)  # alignment probabilities


def _blind_copy(folder: Path, base: Path) -> Path:
    """The model folder as a blind baseline's finetune writes it (step.json config ``blind: true``)."""
    copy = base / f"{folder.name}-blind"
    shutil.copytree(folder, copy)
    step = json.loads((copy / "step.json").read_text())
    step["config"]["blind"] = True
    (copy / "step.json").write_text(json.dumps(step))
    return copy


def test_a_blind_baseline_is_evaluated_as_it_was_trained(world: World, models, tmp_path) -> None:
    """Without the image, VQA answers a question text the same on every image, and retrieval scores every
    gallery image alike: the pessimistic tie rule ranks each caption's image last (R@1 = 0, below chance)."""
    # the train split: enough questions that some are asked of several images
    _, metrics, records = evaluate(_blind_copy(models["vqa"], tmp_path), tmp_path / "vqa", split="train", pictures=2)
    assert metrics["blind"] is True and metrics["init"] == "pretrained"
    drawn = set(_pngs(tmp_path / "vqa"))  # one region only: the co-attention map, no region-attention picture
    assert "coattention_01.png" in drawn and not any(name.startswith("region_attention") for name in drawn)
    answers: dict[str, set[str]] = {}
    for r in records:
        answers.setdefault(r["question"], set()).add(r["prediction"])
    assert all(len(a) == 1 for a in answers.values())
    images = {q: {r["image_id"] for r in records if r["question"] == q} for q in answers}
    assert max(len(i) for i in images.values()) > 1  # some question is asked of several images
    _, seeing, _ = evaluate(models["vqa"], tmp_path / "vqa-seeing", pictures=0)
    assert seeing["blind"] is False
    _, metrics, records = evaluate(_blind_copy(models["retrieval"], tmp_path), tmp_path / "ret", pictures=0)
    gallery = len({r["image_id"] for r in records})  # every test image has captions among the queries
    assert {r["rank"] for r in records} == {gallery} and metrics["value"] == 0.0


def test_output_to_s3(world: World, models, s3_bucket) -> None:
    output = f"{s3_bucket}/eval/refcoco"
    storage.write_bytes(f"{output}/pictures/stale.png", b"old")
    result, metrics, records = evaluate(models["refcoco+"], output, pictures=1, max_examples=3)
    assert metrics["num_examples"] == len(records) == 3 and result.metrics_path == f"{output}/metrics.json"
    listed = set(storage.list_files(output))
    assert {"metrics.json", "predictions.jsonl", "pictures/grounding_examples.png"} <= listed
    assert "pictures/stale.png" not in listed
    assert storage.read_bytes(f"{output}/pictures/coattention_00.png").startswith(b"\x89PNG")


# --- the reusable pieces ------------------------------------------------------------------------------------


def test_predict_and_score_are_side_effect_free(world: World, models) -> None:
    from components.data.tasks import VCRDataConfig, VCRDataset

    model = _tasks_model(models["vcr"]).train()
    data = VCRDataset(TaskFiles(world.root, world.validation), world.regions(), world.tokenizer,
                      VCRDataConfig(split="val"))  # fmt: skip
    first = predict(model, "vcr", data, batch_size=3)
    assert model.training and isinstance(first, Predictions) and len(first) == len(data)
    again = predict(model, "vcr", data, batch_size=1, workers=1)  # items built in a worker process
    assert [r["prediction"] for r in again.records] == [r["prediction"] for r in first.records]
    metrics = score("vcr", first)
    assert set(metrics) == {"vcr_q2a_accuracy", "chance"} and "correct" not in first.records[0]
    with pytest.raises(ValueError, match="zero_shot applies to retrieval only"):
        predict(model, "vcr", data, zero_shot=True)
    with pytest.raises(TypeError, match="needs a RetrievalGallery"):
        predict(model, "retrieval", data)
    assert mlflow_metric_name("recall@1") == "recall_at_1" and mlflow_metric_name("vqa_accuracy") == "vqa_accuracy"


def test_cli_evaluate(world: World, models, tmp_path) -> None:
    from typer.testing import CliRunner

    from components.cli import app

    args = ["evaluate", "--model", str(models["vcr"]), "--output", str(tmp_path / "e"), "--no-tracking",
            "--no-progress", "--max-examples", "3", "--pictures", "0"]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "vcr_q2a_accuracy" in done.output and (tmp_path / "e" / "metrics.json").exists()
    bad = CliRunner().invoke(
        app, ["evaluate", "--model", str(tmp_path), "--output", str(tmp_path / "x"), "--no-tracking"]
    )
    assert bad.exit_code == 1 and "step.json is" in bad.output


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_model_folders(world: World, models, tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        evaluate(tmp_path / "nothing", tmp_path / "e")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"step\.json is missing"):
        evaluate(tmp_path / "empty", tmp_path / "e")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(models["vcr"], unfinished)
    shutil.rmtree(unfinished / "final")
    with pytest.raises(DataError, match="holds no checkpoint"):
        evaluate(unfinished, tmp_path / "e")
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(models["vqa"], no_vocab)
    (no_vocab / "answer_vocab.json").unlink()
    with pytest.raises(DataError, match="answer_vocab.json is missing"):
        evaluate(no_vocab, tmp_path / "e")
    for bad in ({"split": "../x"}, {"batch_size": 0}, {"max_examples": 0}, {"device": "gpu"}):
        with pytest.raises(ValueError):
            EvaluateConfig(model=str(models["vcr"]), output=str(tmp_path / "e"), **bad)
    with pytest.raises(ValueError, match="must not be the model folder"):
        EvaluateConfig(model=str(models["vcr"]), output=str(models["vcr"]))
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_bad_data(world: World, models, tmp_path) -> None:
    with pytest.raises(EmptySplitError, match="split 'testB' has no usable rows.*--split"):
        evaluate(models["refcoco+"], tmp_path / "e", split="testB")
    with pytest.raises(DataError, match=r"tasks/vcr/nope\.jsonl not found"):
        evaluate(models["vcr"], tmp_path / "e", split="nope")
    test_images = {r["image_id"] for r in evaluate(models["refcoco+"], tmp_path / "ok", pictures=0)[2]}
    partial = tmp_path / "partial_store"
    write_store(world.root, partial, skip=frozenset(test_images))
    with pytest.raises(MissingFeaturesError, match="without features in the store"):
        evaluate(models["refcoco+"], tmp_path / "e", features=str(partial))
    other = tmp_path / "other_store"
    write_store(world.root, other, spec=SPEC.__class__(**{**SPEC.to_dict(), "max_boxes": 13}))
    with pytest.raises(FeatureSpecMismatch, match="max_boxes: model 12 vs store 13"):
        evaluate(models["refcoco+"], tmp_path / "e", features=str(other))
    root = tmp_path / "root_without_images"
    shutil.copytree(world.root, root)
    shutil.rmtree(root / "images")
    with pytest.raises(DataError, match=r"images/syn-\d+\.png .* is missing from the dataset root.*pictures=0"):
        evaluate(models["refcoco+"], tmp_path / "e", dataset=str(root), pictures=1, max_examples=1)
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())  # nothing published
