"""The register step and the registry's aliases: the gate, promotion, rollback, and lineage tags.

``register_model(config)`` logs a fine-tuned model (F, with its evaluation E) to MLflow as a pyfunc that answers
requests (components/serving/predictor.py: image + text in, answer / score / box out), bundling the checkpoint directory
(weights, config, tokenizer, feature spec), the feature extractor that made the training features, the serving
settings (and the VQA answer vocabulary), a signature and an input example, and registers it as a new version of
``vilbert-<task>`` (``refcoco+`` -> ``vilbert-refcoco-plus``: a ``+`` reads as a space in URL query strings).
Before anything is logged, the bundle answers its own input example in this process: a bundle that cannot serve
is never registered.

**The gate.**  The version's headline metric (E/metrics.json ``metric`` / ``value``, higher is better) is compared
with the version behind alias ``champion`` and, when there is one, with the version behind ``challenger``: it
*beats* a reference when ``value > reference + min_delta`` (ties do not beat; ``min_delta`` defaults to 0).
It becomes ``challenger`` when it beats both references that exist (so a newer but worse candidate never
displaces a better one waiting for promotion).  The very first version has no reference and becomes
``challenger``.  A reference measured with another metric or on another split cannot be compared: the version
is registered without an alias (``not_comparable``).  The decision is recorded as version tags ``gate.*``.
The version is registered first, then gated under the model's registry lock (:func:`gate_version`,
components/registry/lock.py): concurrent registrations are gated one after the other, never on stale aliases.
Register never moves ``champion``: the first version too is promoted by hand (``vilbert promote``), so
``models:/<name>@champion`` exists only after a person chose it.

**Promotion** (``promote``; a ``champion`` set in the MLflow UI is recorded the same way by the registry-event
listener, components/registry/events.py) moves ``champion`` to a
version (default: the challenger), keeps the previous champion as ``previous-champion``, drops ``challenger``
from the promoted version, and records who, when (UTC ISO 8601) and why as version tags (``champion.*``) and in
the registered model's ``champion.history`` tag (JSON list, newest last).  **Rollback** moves ``champion`` back to
``previous-champion`` (then removes that alias) and records the same.

**Lineage tags** on the version (and its logged model): ``lineage.git_commit`` (+ ``lineage.code_dirty``),
``lineage.data_hash`` and ``lineage.feature_spec_hash`` (F/step.json), ``lineage.checkpoint_hash`` (sha256 of
the weights), ``lineage.dvc.<role>`` (md5 of the dvc.lock out holding the dataset / features / model /
evaluation, when a dvc.lock exists), ``lineage.pipeline_run_id``, ``lineage.finetune_run_id``,
``lineage.evaluation_run_id``, ``lineage.register_run_id``; ``metric.name`` / ``metric.value`` / ``eval.split``
(what the gate reads) and ``eval.<name>`` for every evaluation metric (``recall@1`` -> ``eval.recall_at_1``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components import storage
from components.data.tasks import TASKS
from components.evaluation.scoring import mlflow_metric_name
from components.registry.lineage import dvc_lineage, eval_metrics, version_tags
from components.registry.rules import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    AliasChange,
    GateDecision,
    RegistryError,
    VersionMetric,
    client_for,
    gate,
    promote,
    reference,
    rollback,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS_CHAMPION",
    "AliasChange",
    "GateDecision",
    "RegisterConfig",
    "RegisterResult",
    "RegistryError",
    "VersionMetric",
    "default_model_name",
    "dvc_lineage",
    "gate",
    "gate_version",
    "promote",
    "read_inputs",
    "register_model",
    "rollback",
    "stage_artifacts",
]

#: The registered model of each task (its ``TaskSpec.model_name``).
MODEL_NAMES = {name: spec.model_name for name, spec in TASKS.items()}


def default_model_name(task: str) -> str:
    """The registered model name of ``task``: ``vilbert-<task>`` (``refcoco+`` -> ``vilbert-refcoco-plus``)."""
    try:
        return MODEL_NAMES[task]
    except KeyError:
        raise RegistryError(f"unknown task {task!r}; choose one of {sorted(MODEL_NAMES)}") from None


@dataclass(frozen=True)
class RegisterConfig:
    """One run of the register step."""

    model: str
    """Fine-tuning output folder F (step.json, final/, answer_vocab.json for VQA); for zero-shot retrieval the
    pretraining output folder that the evaluation used."""
    evaluation: str
    """Evaluation output folder E (metrics.json), local or s3://."""
    features: str | None = None
    """Feature store whose extractor is bundled (default: ``features`` of F/step.json)."""
    name: str | None = None
    """Registered model name (default: :func:`default_model_name` of the task)."""
    tracking_uri: str | None = None
    """MLflow tracking / registry URI (default: ``$MLFLOW_TRACKING_URI``, else sqlite ``mlflow.db`` in the project root)."""
    experiment: str = "vilbert"
    """Experiment of the register run (ignored when nested under a pipeline run: the parent's experiment)."""
    pipeline_run: str | None = None
    """Pipeline (parent) run id; default ``$VILBERT_PARENT_RUN_ID``."""
    dvc_lock: str | None = None
    """dvc.lock to read data / feature hashes from (default: the project root's, when there is one)."""
    min_delta: float = 0.0
    """A version beats a reference when its metric exceeds the reference's by more than this."""
    batch_size: int = 16
    """Rows per forward pass when serving."""

    def __post_init__(self) -> None:
        if not self.model.strip() or not self.evaluation.strip():
            raise RegistryError("model and evaluation folders are required")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise RegistryError(f"min_delta must be a finite number >= 0, got {self.min_delta}")
        if self.batch_size < 1:
            raise RegistryError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class RegisterResult:
    """What the register step did."""

    name: str
    version: str
    task: str
    metric: str
    value: float
    decision: str
    reason: str
    aliases: dict[str, str]
    """The registered model's aliases after the step (alias -> version)."""
    model_uri: str
    """``models:/<name>/<version>``."""
    run_id: str
    model_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    """Every tag set on the version (lineage, metrics, gate)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- inputs -----------------------------------------------------------------------------------------------------


def read_inputs(config: RegisterConfig) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """``(step.json, metrics.json, checkpoint folder)`` of F and E, checked against each other (RegistryError)."""
    folder = Path(config.model)
    if storage.is_s3(config.model) or not (folder / "step.json").is_file():
        raise RegistryError(f"{config.model} is not a local pretrain / finetune output folder (no step.json)")
    step = json.loads((folder / "step.json").read_text())
    checkpoint = folder / "final"
    if not (checkpoint / "config.json").is_file():
        raise RegistryError(f"{config.model} has no final checkpoint ({checkpoint}/config.json)")
    try:
        metrics = json.loads(storage.read_bytes(storage.join(config.evaluation, "metrics.json")))
    except FileNotFoundError:
        raise RegistryError(f"{config.evaluation} has no metrics.json: run `vilbert evaluate` first") from None
    task = metrics.get("task")
    if task not in MODEL_NAMES:
        raise RegistryError(
            f"{config.evaluation}/metrics.json names task {task!r}; expected one of {sorted(MODEL_NAMES)}"
        )
    value = metrics.get("value")
    if (
        not metrics.get("metric")
        or isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
    ):
        raise RegistryError(f"{config.evaluation}/metrics.json needs a headline 'metric' and a finite 'value'")
    zero_shot = bool(metrics.get("zero_shot"))
    if step.get("step") == "finetune" and step.get("task") != task:
        raise RegistryError(f"{config.model} was fine-tuned for {step.get('task')!r}, the evaluation is of {task!r}")
    if step.get("step") != "finetune" and not (zero_shot and TASKS[task].zero_shot):
        raise RegistryError(f"{config.model} is a {step.get('step')!r} output: only fine-tuned models (or zero-shot "
                            "retrieval) are registered")  # fmt: skip
    return step, metrics, checkpoint


def stage_artifacts(config: RegisterConfig, step: Mapping[str, Any], metrics: Mapping[str, Any], checkpoint: Path,
                    staging: Path) -> tuple[dict[str, str], str]:  # fmt: skip
    """Stage the serving artifacts of F in ``staging`` (the extractor, the task settings; the checkpoint stays where
    it is); returns ``(artifacts for mlflow.pyfunc.log_model, feature spec hash)``."""
    from components.data.regions import DEFAULT_MAX_REGIONS
    from components.data.tasks.vqa import ANSWER_VOCAB_FILE
    from components.features.spec import FeatureSpec
    from components.serving.bundle import stage_extractor
    from components.serving.predictor import CHECKPOINT, EXTRACTOR, SERVING_FILE, TASK, ServingSpec
    from model.checkpoint import read_feature_spec

    store = config.features or step.get("features")
    if not store:
        raise RegistryError("no feature store: pass features= (F/step.json names none)")
    spec = FeatureSpec.from_dict(stage_extractor(str(store), staging / EXTRACTOR))
    trained_on = read_feature_spec(checkpoint)
    if trained_on is None or FeatureSpec.from_dict(trained_on) != spec:
        raise RegistryError(f"the checkpoint's feature spec {trained_on} is not the store's {spec.to_dict()} "
                            f"({store}): the served features would not be the ones the model was trained on")  # fmt: skip
    if step.get("feature_spec_hash") and step["feature_spec_hash"] != spec.sha256():
        raise RegistryError(f"{store} is not the feature store the model was trained on (feature_spec_hash differs)")
    task_dir = staging / TASK
    task_dir.mkdir()
    serving = ServingSpec(
        task=metrics["task"],
        max_text_length=int(step.get("max_text_length") or 36),
        max_regions=int((step.get("config") or {}).get("max_regions") or DEFAULT_MAX_REGIONS),
        zero_shot=bool(metrics.get("zero_shot")),
        batch_size=config.batch_size,
    )
    (task_dir / SERVING_FILE).write_text(json.dumps(serving.to_dict(), indent=2) + "\n")
    if TASKS[serving.task].answer_vocab:
        vocab = Path(config.model) / ANSWER_VOCAB_FILE
        if not vocab.is_file():
            raise RegistryError(f"{config.model} has no {ANSWER_VOCAB_FILE}: a {TASKS[serving.task].title} model "
                                "cannot answer without it")  # fmt: skip
        (task_dir / ANSWER_VOCAB_FILE).write_bytes(vocab.read_bytes())
    return {CHECKPOINT: str(checkpoint), EXTRACTOR: str(staging / EXTRACTOR), TASK: str(task_dir)}, spec.sha256()


def _self_check(artifacts: Mapping[str, str], task: str) -> None:
    """The staged bundle must answer its own input example, here, before anything is logged."""
    from components.serving.bundle import example_frame
    from components.serving.predictor import ViLBertPredictor

    try:
        answer = ViLBertPredictor.from_artifacts(artifacts, device="cpu").predict(example_frame(task))
    except Exception as exc:
        raise RegistryError(f"the bundled model cannot answer its input example: {type(exc).__name__}: {exc}") from exc
    if len(answer) != 1:
        raise RegistryError(f"the bundled model answered {len(answer)} rows for a 1-row example")


# --- the step ---------------------------------------------------------------------------------------------------


def register_model(config: RegisterConfig, log: Callable[[str], None] = print) -> RegisterResult:
    """Log, register and gate one model version (see the module docstring)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported: nothing phones home
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log lines, not bars, in step logs
    from components.serving.bundle import MODEL_CODE
    from components.tracking import PARENT_RUN_ENV, Tracker, TrackingConfig

    step, metrics, checkpoint = read_inputs(config)
    task, metric, value = metrics["task"], str(metrics["metric"]), float(metrics["value"])
    name = config.name or default_model_name(task)
    client, uri = client_for(config.tracking_uri)
    pipeline_run = config.pipeline_run or os.environ.get(PARENT_RUN_ENV) or None
    with tempfile.TemporaryDirectory(prefix="vilbert-register-") as tmp:
        staging = Path(tmp)
        artifacts, spec_hash = stage_artifacts(config, step, metrics, checkpoint, staging)
        log(f"register: bundled {checkpoint} and the extractor of {config.features or step.get('features')}")
        _self_check(artifacts, task)
        tracking = TrackingConfig(experiment=config.experiment, run_name=f"register-{task}", output_dir=staging,
                                  tracking_uri=uri, parent_run_id=pipeline_run, system_metrics=False,
                                  tags={"vilbert.step": "register", "vilbert.registered_model": name})  # fmt: skip
        tracker = Tracker(tracking).start()
        if tracker.degraded or tracker.run_id is None:
            tracker.end("FAILED")
            raise RegistryError(f"cannot open a run in the MLflow store {uri}: registering needs it")
        tags = version_tags(config, step, metrics, checkpoint, spec_hash, pipeline_run, tracker.run_id)
        entry = staging / "vilbert_model.py"
        entry.write_text(MODEL_CODE)
        status = "FAILED"
        try:
            info = _log_and_register(uri, tracker.run_id, name, entry, artifacts, task, tags)
            version = str(info.registered_model_version)
            decision = gate_version(client, name, version, metric, metrics.get("split"), value, config.min_delta)
            tags.update(decision.tags())
            _describe(client, name, version, task, decision, metric, value, metrics.get("split"))
            tracker.log_metrics({**eval_metrics(metrics), mlflow_metric_name(metric): value})
            tracker.set_tags({"vilbert.registered_version": version, "gate.decision": decision.decision})
            status = "FINISHED"
        finally:
            tracker.end(status)
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    log(f"register: {name} version {version}: {decision.decision} ({decision.reason})")
    return RegisterResult(name, version, task, metric, value, decision.decision, decision.reason, aliases,
                          f"models:/{name}/{version}", tracker.run_id, info.model_id, tags)  # fmt: skip


def gate_version(client: Any, name: str, version: str, metric: str, split: str | None, value: float,
                 min_delta: float = 0.0) -> GateDecision:  # fmt: skip
    """The gate for a registered ``version``: read the references, decide and set ``challenger`` under the model's
    registry lock, so that concurrent registrations are gated one after the other (each against the aliases the one
    before it left); then record the decision as version tags (``gate.*``)."""
    from components.registry.lock import registry_lock

    with registry_lock(client, name):
        decision = gate(metric, split, value, reference(client, name, CHAMPION), reference(client, name, CHALLENGER),
                        min_delta)  # fmt: skip
        if decision.decision == CHALLENGER:
            client.set_registered_model_alias(name, CHALLENGER, version)
    for key, tag in decision.tags().items():  # records only: no gate reads them, so they need not hold the lock
        client.set_model_version_tag(name, version, key, tag)
    return decision


def _log_and_register(uri: str, run_id: str, name: str, entry: Path, artifacts: Mapping[str, str], task: str,
                      tags: Mapping[str, str]) -> Any:  # fmt: skip
    """``mlflow.pyfunc.log_model`` into ``run_id``, registering a version of ``name`` with ``tags``.

    MLflow's fluent API reads the process-wide URIs: they point at ``uri`` (through the environment variables it
    reads) for this call only."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    path = list(sys.path)  # MLflow's input-example check prepends the (temporary) model code folder to sys.path
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    try:
        import mlflow

        from components.serving.bundle import code_paths, example_frame, pinned_requirements, signature

        if mlflow.get_tracking_uri() != uri or mlflow.get_registry_uri() != uri:
            raise RegistryError("mlflow.set_tracking_uri / set_registry_uri was called in this process with another "
                                f"URI ({mlflow.get_tracking_uri()}); registering goes to {uri}")  # fmt: skip
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(entry),
                artifacts=dict(artifacts),
                code_paths=code_paths(),
                signature=signature(task),
                input_example=example_frame(task),
                pip_requirements=pinned_requirements(),
                registered_model_name=name,
                tags=dict(tags),
            )
    finally:
        sys.path[:] = path
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _describe(client: Any, name: str, version: str, task: str, decision: GateDecision, metric: str, value: float,
              split: str | None) -> None:  # fmt: skip
    """Human descriptions: the registered model's (once) and the version's."""
    model = client.get_registered_model(name)
    if not model.description:
        choices = " and `choices` (4 strings)" if TASKS[task].serving.choices else ""
        client.update_registered_model(
            name,
            description=f"ViLBERT for {task}. Input: a DataFrame with `image` (base64, path, file:// or s3:// URI) "
            "and `text`" + choices + "; output per row: see the "
            "signature. Aliases: `champion` (served), `challenger` (set by `vilbert register` when a version beats "
            "the champion), `previous-champion` (for `vilbert rollback`).",
        )
        client.set_registered_model_tag(name, "task", task)
    client.update_model_version(name, version, description=f"{metric} = {value:g} on {split}; gate: {decision.reason}")
