"""The Kubeflow pipeline: the committed IR YAML is current and parses into KFP's PipelineSpec, invalid
parameters are refused before anything runs, and (slow) the tiny pipeline runs end to end under kfp.local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.full import COMPILED, PipelineParamError, PipelineParams, compile_pipeline, parse_params

ROOT = Path(__file__).resolve().parent.parent
#: The smallest settings that still run every step for real (tiny world, two steps of training).
TINY = [
    "source=synthetic://shapes?seed=0&n=40&size=64",
    "demo_epochs=1",
    "demo_train_images=20",
    "pretrain.trainer.epochs=null",
    "pretrain.trainer.max_steps=2",
    "pretrain.trainer.batch_size=4",
    "finetune.trainer.epochs=null",
    "finetune.trainer.max_steps=2",
    "finetune.trainer.batch_size=4",
    "finetune.answer_min_count=1",
    'tasks=["vqa"]',
    "evaluate.batch_size=16",
    "evaluate.max_examples=20",
]


def test_committed_yaml_is_current_and_parses(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "full.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "pipelines/full.yaml is stale: run `make pipeline-yaml`"
    docs = list(yaml.safe_load_all(COMPILED.read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "vilbert-full"
    tasks = spec.root.dag.tasks
    assert {"ingest-op", "validate-op", "features-op", "pretrain-op", "table-op"} <= set(tasks)
    loops = [t for t in tasks.values() if t.WhichOneof("iterator") == "parameter_iterator"]
    assert len(loops) == 3  # pretrained, scratch and blind fine-tuning fan out over the tasks
    assert set(spec.root.input_definitions.parameters) == {f for f in PipelineParams.__dataclass_fields__}
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pretrain = platform["exec-pretrain-op"]
    assert (
        pretrain["nodeSelector"]
        and pretrain["tolerations"]
        and pretrain["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    )
    assert {s["secretName"] for s in pretrain["secretAsEnv"]} == {"vilbert-s3", "vilbert-mlflow-client"}
    assert pretrain["pvcMount"][0]["mountPath"] == "/data/checkpoints"
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/vilbert-mlops:0.1.0"}


def test_kfp_cli_compiles_the_same_yaml(tmp_path: Path) -> None:
    out = tmp_path / "cli.yaml"
    kfp = Path(sys.executable).parent / "kfp"
    subprocess.run([str(kfp), "dsl", "compile", "--py", str(ROOT / "pipelines/full.py"), "--output", str(out),
                    "--function", "full_pipeline"], check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    assert out.read_text() == COMPILED.read_text()


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (['tasks=["vqa","nlvr2"]'], "tasks must be distinct names"),
        (["launcher=slurm"], "launcher must be local or pytorchjob"),
        (["pretrain.trainer.epochs=null", "pretrain.trainer.max_steps=null"], "set max_steps and/or epochs"),
        (["pretrain.preset=huge"], "unknown preset"),
        (["no_such=1"], "unknown pipeline parameters"),
        (["finetune.trainer.lr=-1"], r"finetune \(vqa\): .*lr must be positive"),
        (["finetune.trainer.lrr=1"], "finetune: unknown key trainer.lrr"),
        (["pretrain.trainer.lr=fast"], "not a valid float"),
        (["evaluate.batch_size=many"], "evaluate: .*not a valid int"),
        (["finetune.by_task.vqaa.trainer.lr=1"], "by_task names unknown task vqaa"),
        (["evaluate"], "name=value"),
    ],
)
def test_invalid_parameters_are_refused_before_any_step(pairs: list[str], message: str) -> None:
    with pytest.raises(PipelineParamError, match=message):
        parse_params(pairs)


def test_invalid_parameters_exit_before_running(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines/full.py"), "run", "--pipeline-root", str(tmp_path),
                           "-p", "launcher=slurm"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "launcher must be local or pytorchjob" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_parameters_coerce_numbers_for_kfp() -> None:
    params = parse_params(["pretrain.trainer.epochs=1", 'tasks=["vqa"]', "finetune.head_lr_mult=3"])
    assert params.pretrain["trainer"]["epochs"] == 1.0 and params.tasks == ["vqa"]
    assert params.pretrain_config("/x").trainer.epochs == 1.0 and params.finetune["head_lr_mult"] == 3.0
    assert params.arguments()["data_version"] == "uri:" + params.source


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_pipeline_runs_end_to_end_with_kfp_local(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    args = [a for pair in TINY for a in ("-p", pair)]
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines/full.py"), "run", "--pipeline-root",
                           str(tmp_path / "root"), *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tables = list((tmp_path / "root").rglob("table-op/table"))
    assert tables, "the table step left no Markdown artifact"
    text = tables[0].read_text()
    assert "VQA" in text and "Zero-shot" in text and "Blind baseline" in text
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    names = {m.name for m in client.search_registered_models()}
    assert "vilbert-vqa" in names, names
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.info.run_name == "pipeline-kfp-local"]
    assert parent and any(r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id for r in runs)
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "root").rglob("evaluation/metrics.json")]
    assert len(metrics) == 4  # (pretrained, scratch, blind) + zero-shot
    rows = sorted(("zero-shot" if m["zero_shot"] else m["init"], m["blind"]) for m in metrics)
    assert rows == [("pretrained", False), ("scratch", False), ("scratch", True), ("zero-shot", False)]


def test_data_version_of_an_s3_source_follows_its_content(s3_bucket: str) -> None:
    from components import storage
    from pipelines.full import data_version

    storage.write_bytes(f"{s3_bucket}/cc/train.tsv", b"caption\turl\n")
    first = data_version(f"{s3_bucket}/cc")
    assert first.startswith("etag:") and first == data_version(f"{s3_bucket}/cc")
    storage.write_bytes(f"{s3_bucket}/cc/train.tsv", b"caption\turl\nanother\trow\n")
    assert data_version(f"{s3_bucket}/cc") != first
    assert data_version(f"{s3_bucket}/nothing-here") == f"uri:{s3_bucket}/nothing-here"
