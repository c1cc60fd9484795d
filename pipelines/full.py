"""The full ViLBERT pipeline in Kubeflow Pipelines (KFP v2):

    ingest -> validate -> features -> pretrain -> fine-tune per task (ParallelFor; pretrained and scratch)
           -> evaluate (+ zero-shot retrieval) -> table, and register each pretrained fine-tune

Run it here with ``kfp.local``, compile it to IR YAML, or submit it to a KFP endpoint::

    python pipelines/full.py run                      # the embedded default, on this machine
    python pipelines/full.py compile -o pipelines/full.yaml
    python pipelines/full.py submit --host https://kfp.example.com

The parameters' defaults come from params.yaml, as dvc.yaml's do; ``pretrain``, ``finetune`` and ``evaluate``
are the step configs' settings (see ``PipelineParams``).  They are checked before anything runs.  The same steps are the stages of dvc.yaml.
"""

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

if __package__ in (None, ""):  # `python pipelines/full.py`: make the project importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import typer
from kfp import dsl, kubernetes

from components.data.tasks import TASK_NAMES
from pipelines.components import (
    GPU_IMAGE,
    evaluate_op,
    features_op,
    finetune_op,
    ingest_op,
    pretrain_op,
    register_op,
    table_op,
    validate_op,
)

PIPELINE_NAME = "vilbert-full"
ROOT = Path(__file__).resolve().parent.parent
COMPILED = Path(__file__).resolve().parent / "full.yaml"
#: Kubernetes Secrets the steps read credentials from (templates in infra/k8s/components/secrets).
S3_SECRET = ("vilbert-s3", {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
MLFLOW_SECRET = ("vilbert-mlflow-client", {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})  # fmt: skip
CONFIG_MAP = "vilbert-config"  # MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")


class PipelineParamError(ValueError):
    """A pipeline parameter is invalid; raised before any step runs."""


#: params.yaml: the defaults of the pipeline's parameters are the DVC pipeline's (one file for both engines).
PARAMS_FILE = ROOT / "params.yaml"


def _params_file() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(PARAMS_FILE.read_text()) or {}


PARAMS = _params_file()


def step_classes() -> dict[str, Any]:
    """The steps whose settings the pipeline passes as one JSON document each, by parameter name."""
    from components.steps.evaluate import EvaluateConfig
    from components.steps.finetune import FinetuneConfig
    from components.steps.pretrain import PretrainConfig

    return {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}


def step_settings(step: str) -> dict[str, Any]:
    """A step's settings in params.yaml: its sections (e.g. ``model`` then ``pretrain``) merged, as
    ``vilbert <step> --config params.yaml`` reads them (a section params.yaml lacks adds nothing)."""
    from components.config import merge_all

    return merge_all(PARAMS.get(name, {}) for name in step_classes()[step].SECTIONS)


def settings_json(settings: dict[str, Any]) -> str:
    """A training step's settings as the pipeline passes them: one JSON document (keys sorted, so the compiled
    YAML is stable), parsed and checked by the step config inside the op."""
    return json.dumps(settings, sort_keys=True)


#: Stand-ins for the artifacts' paths when ``PipelineParams.check`` builds the step configs before anything runs.
PLACEHOLDERS = {"dataset": "/placeholder/dataset", "validation": "/placeholder/validation",
                "features": "/placeholder/features"}  # fmt: skip


@dataclass(frozen=True)
class PipelineParams:
    """The pipeline's parameters (names and defaults as in the compiled pipeline), checked as a whole.

    ``pretrain``, ``finetune`` and ``evaluate`` are the step configs' settings (nested mappings of
    PretrainConfig / FinetuneConfig / EvaluateConfig fields, e.g. ``{"trainer": {"lr": 2e-4}}``); each op builds its config from them with the same
    loader as the command line, and ``check`` builds them here first.  Set one field with a dotted name:
    ``-p pretrain.trainer.max_steps=2``."""

    source: str = PARAMS["data"]["source"]
    """ingest: the data source (synthetic://, a folder, s3://, cc://, coco://)."""
    data_version: str = ""
    """ingest: the data's identity (DVC hash / S3 ETag); the cache key of ingest.  Empty: derived from source."""
    features_backend: str = PARAMS["features"]["backend"]
    """features: demo or detector."""
    demo_epochs: int = PARAMS["features"]["demo_epochs"]
    """features: demo detector training epochs."""
    demo_train_images: int = PARAMS["features"]["demo_train_images"]
    """features: demo detector training images."""
    pretrain: dict[str, Any] = field(default_factory=lambda: step_settings("pretrain"))
    """pretrain: PretrainConfig settings (params.yaml's model + pretrain sections)."""
    launcher: str = "local"
    """pretrain: local (torchrun in the step; ``pretrain.nproc`` processes) or pytorchjob (Training Operator)."""
    pytorchjob_nodes: int = 1
    """pretrain (pytorchjob): nodes."""
    pytorchjob_gpus_per_node: int = 1
    """pretrain (pytorchjob): GPUs (= processes) per node."""
    tasks: list[str] = field(default_factory=lambda: list(PARAMS["matrix"]["tasks"]))
    """finetune / evaluate: the tasks (ParallelFor)."""
    finetune: dict[str, Any] = field(default_factory=lambda: step_settings("finetune"))
    """finetune: FinetuneConfig settings (params.yaml's model + finetune sections); the task and init are the
    pipeline's."""
    evaluate: dict[str, Any] = field(default_factory=lambda: step_settings("evaluate"))
    """evaluate: EvaluateConfig settings (params.yaml's evaluate section: split, batch size, examples)."""
    experiment: str = PARAMS["tracking"]["experiment"]
    """MLflow experiment of every step."""

    def check(self) -> None:
        """Raise :class:`PipelineParamError` listing every invalid value; the training settings are built into
        their step configs (on placeholder paths), so they cannot drift from what the steps accept."""
        from components.config import ConfigError

        errors = []
        if not self.source.strip():
            errors.append("source is empty")
        if self.features_backend not in ("demo", "detector"):
            errors.append(f"features_backend must be demo or detector, got {self.features_backend!r}")
        if self.launcher not in ("local", "pytorchjob"):
            errors.append(f"launcher must be local or pytorchjob, got {self.launcher!r}")
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            errors.append(f"tasks must be distinct names from {list(TASK_NAMES)}, got {self.tasks}")
        for name in ("demo_epochs", "demo_train_images", "pytorchjob_nodes"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pytorchjob_gpus_per_node < 0:
            errors.append("pytorchjob_gpus_per_node must be >= 0")
        try:
            self.pretrain_config("/placeholder/pretrain")
        except ConfigError as err:
            errors.append(f"pretrain: {err}")
        for task in self.tasks if not unknown else ():
            try:
                self.finetune_config(task, "scratch", "/placeholder/finetune")
            except ConfigError as err:
                errors.append(f"finetune ({task}): {err}")
                break
        try:
            self.evaluate_config()
        except ConfigError as err:
            errors.append(f"evaluate: {err}")
        if errors:
            raise PipelineParamError("invalid pipeline parameters: " + "; ".join(errors))

    def evaluate_config(self) -> Any:
        from pipelines.launchers import evaluate_config

        paths = {**PLACEHOLDERS, "model": "/placeholder/model", "output": "/placeholder/evaluation"}
        return evaluate_config(self.evaluate, paths, False, self.experiment)

    def pretrain_config(self, output: str) -> Any:
        from pipelines.launchers import pretrain_config

        return pretrain_config(self.pretrain, PLACEHOLDERS, output, self.experiment)

    def finetune_config(self, task: str, init: str, output: str) -> Any:
        from pipelines.launchers import finetune_config

        paths = {**PLACEHOLDERS, "pretrained": "/placeholder/pretrain"}
        return finetune_config(self.finetune, paths, task, init, False, output, self.experiment)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "PipelineParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PipelineParamError(f"unknown pipeline parameters {unknown}; known: {sorted(known)}")
        types = {f.name: f.type for f in fields(cls)}
        for name, value in values.items():  # KFP checks types exactly: 2 is not a float parameter, 2.0 is
            if types[name] in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
                values[name] = float(value)
        for name in step_classes():  # a params file may give them as JSON text, as KFP does
            if isinstance(values.get(name), str):
                values[name] = json.loads(values[name])
        params = cls(**values)
        params.check()
        return params

    def arguments(self) -> dict[str, Any]:
        """The pipeline call's arguments (with data_version filled in)."""
        values = asdict(self)
        values["data_version"] = self.data_version or data_version(self.source)
        for name in step_classes():
            values[name] = settings_json(getattr(self, name))
        return values


def data_version(source: str) -> str:
    """The identity of the data behind ``source``, for ingest's cache key: a hash of the ETags below an S3
    prefix, the DVC hash of a DVC-tracked folder, else the source URI itself (synthetic:// worlds are
    deterministic)."""
    import hashlib

    from components import storage

    if storage.is_s3(source):
        files = sorted((f.path, f.etag or "") for f in storage.list_file_info(source))
        if files:
            return "etag:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()
        return "uri:" + source
    lock = ROOT / "dvc.lock"
    if Path(source).exists() and lock.exists():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if Path(ROOT / out["path"]).resolve() == Path(source).resolve():
                    return "dvc:" + out.get("md5", "")
    return "uri:" + source


def _platform(task: dsl.PipelineTask, gpu: bool = False, shm: bool = False) -> dsl.PipelineTask:
    """Credentials from Secrets, endpoints from the ConfigMap, and for training steps GPUs and /dev/shm."""
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET[0], secret_key_to_env=S3_SECRET[1])
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET[0], secret_key_to_env=MLFLOW_SECRET[1])
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP,
                                     config_map_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
                                                            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"})  # fmt: skip
    if shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    if gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        task.set_cpu_request("4").set_memory_request("32G")
        kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="ViLBERT: ingest -> validate -> features -> pretrain -> finetune -> "
              "evaluate -> register, and the pretrained-vs-scratch table")  # fmt: skip
def full_pipeline(
    source: str = PipelineParams.source,
    data_version: str = "",
    features_backend: str = PipelineParams.features_backend,
    demo_epochs: int = PipelineParams.demo_epochs,
    demo_train_images: int = PipelineParams.demo_train_images,
    pretrain: str = settings_json(step_settings("pretrain")),
    launcher: str = PipelineParams.launcher,
    pytorchjob_nodes: int = PipelineParams.pytorchjob_nodes,
    pytorchjob_gpus_per_node: int = PipelineParams.pytorchjob_gpus_per_node,
    tasks: list = list(PARAMS["matrix"]["tasks"]),  # noqa: B006, B008 - KFP reads the default from the signature
    finetune: str = settings_json(step_settings("finetune")),
    evaluate: str = settings_json(step_settings("evaluate")),
    experiment: str = PipelineParams.experiment,
) -> None:
    ingest = _platform(ingest_op(source=source, data_version=data_version))
    ingest.set_retry(num_retries=3, backoff_duration="30s")  # object-store reads are the transient part
    validate = _platform(validate_op(dataset=ingest.outputs["dataset"]))
    dataset, validation = ingest.outputs["dataset"], validate.outputs["validation"]
    features = _platform(features_op(dataset=dataset, backend=features_backend, demo_epochs=demo_epochs,
                                     demo_train_images=demo_train_images), shm=True)  # fmt: skip
    features.after(validate)
    features.set_retry(num_retries=2, backoff_duration="60s")
    store = features.outputs["features"]
    pretrain_task = _platform(
        pretrain_op(dataset=dataset, validation=validation, features=store, settings=pretrain, launcher=launcher,
                    experiment=experiment, pytorchjob_nodes=pytorchjob_nodes,
                    pytorchjob_gpus_per_node=pytorchjob_gpus_per_node),
        gpu=True, shm=True,
    )  # fmt: skip
    pretrain_task.set_retry(num_retries=2, backoff_duration="60s")  # a restarted step resumes from its checkpoints
    kubernetes.mount_pvc(pretrain_task, pvc_name="vilbert-checkpoints", mount_path="/data/checkpoints")
    pretrained = pretrain_task.outputs["model"]
    common = dict(dataset=dataset, validation=validation, features=store, settings=finetune, experiment=experiment)
    evaluation = dict(dataset=dataset, validation=validation, features=store, settings=evaluate, experiment=experiment)
    with dsl.ParallelFor(tasks, name="tasks-pretrained") as task:
        tuned = _platform(
            finetune_op(task=task, init="pretrained", pretrained=pretrained, **common), gpu=True, shm=True
        )
        evaluated = _platform(evaluate_op(model=tuned.outputs["model"], zero_shot=False, **evaluation), shm=True)
        _platform(register_op(finetuned=tuned.outputs["model"], evaluation=evaluated.outputs["evaluation"],
                              features=store, experiment=experiment))  # fmt: skip
    with dsl.ParallelFor(tasks, name="tasks-scratch") as task:
        scratch = _platform(finetune_op(task=task, init="scratch", pretrained=pretrained, **common), gpu=True, shm=True)
        scratch_eval = _platform(evaluate_op(model=scratch.outputs["model"], zero_shot=False, **evaluation), shm=True)
    with dsl.ParallelFor(tasks, name="tasks-blind") as task:  # the same model and code without the image
        blind = _platform(finetune_op(task=task, init="scratch", pretrained=pretrained, blind=True, **common), gpu=True,
                          shm=True)  # fmt: skip
        blind_eval = _platform(evaluate_op(model=blind.outputs["model"], zero_shot=False, **evaluation), shm=True)
    zero_shot = _platform(evaluate_op(model=pretrained, zero_shot=True, **evaluation), shm=True)
    _platform(table_op(pretrained=dsl.Collected(evaluated.outputs["evaluation"]),
                       scratch=dsl.Collected(scratch_eval.outputs["evaluation"]),
                       zero_shot=zero_shot.outputs["evaluation"], blind=dsl.Collected(blind_eval.outputs["evaluation"]),
                       experiment=experiment))  # fmt: skip


# ---- command line ------------------------------------------------------------------------------------------------

cli = typer.Typer(help="The full ViLBERT pipeline on Kubeflow Pipelines: run locally, compile, submit.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)  # fmt: skip
ParamOption = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help="A pipeline parameter as name=value (JSON values; repeat), or one training setting as "
        "pretrain.KEY=value / finetune.KEY=value (e.g. pretrain.trainer.lr=3e-4).",
    ),
]


def parse_params(pairs: list[str] | None, params_file: str | None = None) -> "PipelineParams":
    """PipelineParams from a JSON/YAML file and name=value pairs.  A dotted name sets one field of a training
    step's settings, read as that field's type (``pretrain.trainer.lr=3e-4``); other values are parsed as JSON,
    else kept as text."""
    from components.config import ConfigError, assignments, deep_merge

    values: dict[str, Any] = {}
    if params_file:
        import yaml

        values.update(yaml.safe_load(Path(params_file).read_text()) or {})
    steps = step_classes()
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep:
            raise PipelineParamError(f"--param wants name=value, got {pair!r}")
        step, dot, key = name.partition(".")
        if dot and step in steps:
            try:
                update = assignments(steps[step], [f"{key}={raw}"])
            except ConfigError as err:
                raise PipelineParamError(f"{step}: {err}") from None
            base = values.get(step, getattr(PipelineParams(), step))
            values[step] = deep_merge(base, update)
            continue
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return PipelineParams.from_mapping(values)


def compile_pipeline(output: Path) -> Path:
    """Write the IR YAML (what ``kfp dsl compile --py pipelines/full.py`` writes)."""
    from kfp import compiler

    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(full_pipeline, package_path=str(output))
    return output


def run_local(params: PipelineParams, pipeline_root: Path, tracking_uri: str | None = None) -> Any:
    """Run the pipeline on this machine with kfp.local's SubprocessRunner (this Python environment); the MLflow
    runs of the steps nest under one pipeline run."""
    from kfp import local

    from components.tracking import PARENT_RUN_ENV, Tracker, TrackingConfig, default_tracking_uri

    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri or default_tracking_uri())
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    with Tracker(TrackingConfig(experiment=params.experiment, run_name="pipeline-kfp-local",
                                tags={"orchestrator": "kfp.local"})) as parent:  # fmt: skip
        parent.log_params(params.arguments())
        if parent.run_id:
            os.environ[PARENT_RUN_ENV] = parent.run_id
        try:
            return full_pipeline(**params.arguments())
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)


@cli.command("run")
def run_command(
    param: ParamOption = None,
    params_file: Annotated[str | None, typer.Option(help="YAML/JSON file of pipeline parameters.")] = None,
    pipeline_root: Annotated[Path, typer.Option(help="Where kfp.local keeps the artifacts.")] = ROOT / "runs" / "kfp",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite mlflow.db).")] = None,
) -> None:
    """Run the pipeline locally (kfp.local SubprocessRunner) on the embedded default."""
    params = parse_params(param, params_file)
    run_local(params, pipeline_root, tracking_uri)
    typer.echo(f"pipeline finished; artifacts under {pipeline_root}")


@cli.command("compile")
def compile_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="IR YAML to write.")] = COMPILED,
) -> None:
    """Compile the pipeline to KFP IR YAML."""
    typer.echo(str(compile_pipeline(output)))


@cli.command("submit")
def submit_command(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. https://kfp.example.com/pipeline.")],
    param: ParamOption = None,
    params_file: Annotated[str | None, typer.Option(help="YAML/JSON file of pipeline parameters.")] = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment name.")] = "vilbert",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace (multi-user KFP).")] = None,
    run_name: Annotated[str | None, typer.Option(help="Run name (default: KFP's).")] = None,
) -> None:
    """Compile and submit a run to a KFP endpoint (credentials: KF_PIPELINES_SA_TOKEN_PATH / kubeconfig)."""
    from kfp import Client

    params = parse_params(param, params_file)
    client = Client(host=host, namespace=namespace)
    run = client.create_run_from_pipeline_func(full_pipeline, arguments=params.arguments(),
                                               experiment_name=experiment, run_name=run_name)  # fmt: skip
    typer.echo(json.dumps({"run_id": run.run_id, "host": host}))


def main() -> None:  # pragma: no cover - script entry
    try:
        cli()
    except PipelineParamError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["GPU_IMAGE", "PipelineParams", "compile_pipeline", "full_pipeline", "parse_params", "run_local"]
