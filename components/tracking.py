"""MLflow tracking for every step, through one small class.

* one experiment per pipeline, one run per step, nested under a parent run per pipeline execution
  (``parent_run_id``, or the ``VILBERT_PARENT_RUN_ID`` environment variable);
* params (the flattened config), step metrics, MLflow system metrics (when psutil is there), the resolved
  config as a JSON artifact, artifacts (files or folders), and lineage tags ``lineage.git_commit``,
  ``lineage.data_hash``, ``lineage.feature_spec_hash``, ``lineage.checkpoint_hash``;
* only rank 0 talks to MLflow: on other ranks every method does nothing;
* when the tracking server cannot be reached (or fails later) the tracker warns once and appends what it
  would have logged to ``<output_dir>/tracking_fallback.jsonl``: a step never fails for want of a server.

Default store: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<project root>/mlflow.db``.  mlflow is imported
when a run starts, never at import time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "VILBERT_PARENT_RUN_ID"
FALLBACK_FILE = "tracking_fallback.jsonl"
RESUME_KEY_TAG = "vilbert.resume_key"
_MAX_PARAM_VALUE = 6000  # MLflow's limit for one param value
_BATCH = 100  # MLflow's limit for params / tags per log_batch call


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``pyproject.toml``
    or ``.git``; ``start`` itself when there is none."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return start


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the sqlite store ``mlflow.db`` in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def git_commit(folder: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``folder`` (None outside a repository or without git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder or project_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts / dataclasses -> ``{"a.b.c": "value"}``; lists as JSON, everything else as ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return {prefix or "value": text}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


@dataclass
class TrackingConfig:
    """Where and under which names a step's run is recorded."""

    experiment: str
    """Experiment name: one per pipeline (e.g. ``vilbert-full``)."""
    run_name: str
    """Run name: the step (``pretrain``, ``finetune-vqa``, ...)."""
    output_dir: Path | None = None
    """Where ``tracking_fallback.jsonl`` goes when MLflow is unreachable (default: the working directory)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<project root>/mlflow.db``."""
    parent_run_id: str | None = None
    """Parent (pipeline execution) run; None: ``$VILBERT_PARENT_RUN_ID`` when set."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags for the run."""
    resume_key: str | None = None
    """Reuse the unfinished run tagged with this key (a worker restarted by torchrun continues its run)."""
    system_metrics: bool = True
    """Log MLflow's system metrics (CPU, memory, GPU) when psutil is installed."""
    system_metrics_interval_s: float = 10.0
    """Sampling interval of the system metrics."""
    connect_timeout_s: float = 5.0
    """How long to wait for an HTTP tracking server's /health before falling back."""
    http_retries: int = 2
    """MLflow HTTP retries per request (MLflow's default, 7, can stall a step for minutes)."""
    enabled: bool = True
    """False: track nothing (every method is a no-op)."""

    def __post_init__(self) -> None:
        if not self.experiment.strip() or not self.run_name.strip():
            raise ValueError("experiment and run_name must be non-empty")
        if self.connect_timeout_s <= 0 or self.system_metrics_interval_s <= 0 or self.http_retries < 0:
            raise ValueError("connect_timeout_s and system_metrics_interval_s must be > 0, http_retries >= 0")
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir)


class Tracker:
    """One step's MLflow run; use as a context manager (``with Tracker(cfg) as t: ...``).

    The run ends FINISHED, or FAILED when the block raises."""

    def __init__(self, config: TrackingConfig, rank: int | None = None):
        self.config = config
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.active = config.enabled and self.rank == 0
        self.tracking_uri = config.tracking_uri or default_tracking_uri()
        self.parent_run_id = config.parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.degraded = False
        self.fallback_path = (config.output_dir or Path.cwd()) / FALLBACK_FILE
        self._client: Any = None
        self._monitor: Any = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    def start(self) -> Tracker:
        """Create (or, with ``resume_key``, reuse) the run; tag it with the git commit."""
        if not self.active or self.run_id is not None or self.degraded:
            return self
        tags = {**self.config.tags}
        commit = git_commit()
        if commit:
            tags.update({"lineage.git_commit": commit, "mlflow.source.git.commit": commit})
        if self.config.resume_key:
            tags[RESUME_KEY_TAG] = self.config.resume_key
        try:
            self._connect()
            self._open_run(tags)
        except Exception as exc:  # whatever the backend raises: unreachable, refused, misconfigured
            self._degrade(exc, "start", {"experiment": self.config.experiment, "run_name": self.config.run_name,
                                         "parent_run_id": self.parent_run_id, "tags": tags})  # fmt: skip
            return self
        self._start_system_metrics()
        return self

    def end(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run terminated (FINISHED, FAILED or KILLED)."""
        if not self.active:
            return
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self.run_id is not None and not self.degraded:
            self._call("end", {"status": status}, lambda: self._client.set_terminated(self.run_id, status))
        elif self.degraded:
            self._record("end", {"status": status})
        self.active = False

    # ---- logging -----------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any] | Any, prefix: str = "") -> None:
        """Log a (nested) config as flat params ``prefix.a.b``; values longer than MLflow allows are cut."""
        if not self.active:
            return
        flat = {k[:250]: v if len(v) <= _MAX_PARAM_VALUE else v[: _MAX_PARAM_VALUE - 3] + "..."
                for k, v in flatten(_jsonable(params), prefix).items()}  # fmt: skip
        self._call("params", flat, lambda: self._batch(params=flat))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step``."""
        if not self.active or not metrics:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._call("metrics", {"step": step, "values": values}, lambda: self._batch(metrics=values, step=step or 0))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings; None values are skipped)."""
        if not self.active:
            return
        values = {k: str(v) for k, v in tags.items() if v is not None}
        if not values:
            return
        self._call("tags", values, lambda: self._batch(tags=values))

    def log_lineage(
        self,
        data_hash: str | None = None,
        feature_spec_hash: str | None = None,
        checkpoint_hash: str | None = None,
        **more: str | None,
    ) -> None:
        """Lineage tags ``lineage.<name>`` (the git commit is tagged when the run starts)."""
        values = {"data_hash": data_hash, "feature_spec_hash": feature_spec_hash, "checkpoint_hash": checkpoint_hash}
        self.set_tags({f"lineage.{k}": v for k, v in {**values, **more}.items()})

    def log_config(self, config: Any, name: str = "config.json", prefix: str = "") -> None:
        """The resolved config: its flattened values as params and the whole as a JSON artifact."""
        if not self.active:
            return
        data = _jsonable(config)
        self.log_params(data, prefix)
        text = json.dumps(data, indent=2, default=str) + "\n"
        if self.degraded:
            self._record("config", {"name": name, "config": json.loads(text)})
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self._call("config", {"name": name, "config": json.loads(text)},
                       lambda: self._client.log_artifact(self.run_id, str(path)))  # fmt: skip

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a whole folder (e.g. the final checkpoint, pictures)."""
        if not self.active:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        info = {"path": str(path.resolve()), "artifact_path": artifact_path, "dir": path.is_dir()}
        if path.is_dir():
            self._call("artifact", info, lambda: self._client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._call("artifact", info, lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def child_env(self) -> dict[str, str]:
        """Environment that nests the runs of child processes (pipeline steps) under this run."""
        return {PARENT_RUN_ENV: self.run_id} if self.run_id else {}

    # ---- internals ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.config.http_retries))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            # A quick probe first: MLflow's own client would retry an unreachable server for minutes.
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=self.config.connect_timeout_s):
                pass
        elif uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)

    def _experiment_id(self, client: Any) -> str:
        """The experiment's id, creating it when missing; a concurrent process may create it first (two
        ``vilbert register`` at once): then its experiment is used."""
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.config.experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(client.create_experiment(self.config.experiment, self._artifact_location()))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(self.config.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def _open_run(self, tags: dict[str, str]) -> None:
        client = self._client
        if self.parent_run_id:
            self.experiment_id = client.get_run(self.parent_run_id).info.experiment_id
            tags["mlflow.parentRunId"] = self.parent_run_id
        else:
            self.experiment_id = self._experiment_id(client)
        if self.config.resume_key:
            key = self.config.resume_key.replace("'", "")
            found = client.search_runs(
                [self.experiment_id], f"tags.`{RESUME_KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
                max_results=1, order_by=["attributes.start_time DESC"],
            )  # fmt: skip
            if found:
                self.run_id = found[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
                log.info("continuing MLflow run %s (resume key %s)", self.run_id, key)
                return
        run = client.create_run(self.experiment_id, tags=tags, run_name=self.config.run_name)
        self.run_id = run.info.run_id

    def _artifact_location(self) -> str | None:
        """Next to a sqlite store (MLflow's default would be ./mlruns in whatever the working directory is)."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        db = Path(self.tracking_uri[len("sqlite:///") :])
        return str(db.parent / "mlruns" / re.sub(r"[^A-Za-z0-9._-]", "_", self.config.experiment))

    def _start_system_metrics(self) -> None:
        if not self.config.system_metrics:
            return
        try:
            import psutil  # noqa: F401  (mlflow's monitor needs it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self.config.system_metrics_interval_s, tracking_uri=self.tracking_uri
            )
            self._monitor.start()
        except Exception as exc:  # optional: never fail a step for it
            log.info("system metrics not logged: %s", exc)
            self._monitor = None

    def _batch(
        self,
        params: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
    ) -> None:
        """``log_batch`` in chunks MLflow accepts (100 params or tags, 1000 metrics per call).  mlflow is
        imported here, so a degraded tracker never needs it."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        batches: dict[str, tuple[list[Any], int]] = {
            "params": ([Param(k, v) for k, v in (params or {}).items()], _BATCH),
            "metrics": ([Metric(k, v, now, step) for k, v in (metrics or {}).items()], 1000),
            "tags": ([RunTag(k, v) for k, v in (tags or {}).items()], _BATCH),
        }
        for kind, (items, size) in batches.items():
            for i in range(0, len(items), size):
                self._client.log_batch(self.run_id, **{kind: items[i : i + size]})

    def _call(self, kind: str, payload: Any, action) -> None:
        """Run one backend call; on failure (or once degraded) record ``payload`` locally instead."""
        if self.degraded:
            self._record(kind, payload)
            return
        try:
            action()
        except Exception as exc:
            self._degrade(exc, kind, payload)

    def _degrade(self, exc: Exception, kind: str, payload: Any) -> None:
        if not self.degraded:
            self.degraded = True
            message = (
                f"MLflow tracking at {self.tracking_uri} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                f"continuing without it, logging to {self.fallback_path} instead"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning(message)
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None
            self._record("degraded", {"error": f"{type(exc).__name__}: {exc}", "tracking_uri": self.tracking_uri,
                                      "run_id": self.run_id})  # fmt: skip
        self._record(kind, payload)

    def _record(self, kind: str, payload: Any) -> None:
        """Append one JSON line to the fallback log (flushed at once: nothing lost on a crash)."""
        self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
        line = {"time": time.time(), "kind": kind, "experiment": self.config.experiment,
                "run_name": self.config.run_name, "data": payload}  # fmt: skip
        with open(self.fallback_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
