"""``vilbert serve``: serve ``models:/<name>@champion`` and follow the alias as it moves.

:class:`ChampionService` loads the version behind the alias (downloaded from the registry, loaded as the pyfunc it
was registered as) and health-checks it before it takes traffic: the version must answer its task's input example
(components/serving/bundle.py) with one row in its output columns.  When the alias moves -- a registry webhook
(an ``mlflow server`` store: the service subscribes its own receiver, ``POST /mlflow-events``, and unsubscribes on
exit) or, with any store, the poll every ``poll_s`` seconds -- the new version is loaded and checked beside the
one serving; it takes over only when it passed, otherwise the old one keeps serving and ``GET /version`` reports
the failure.  A removed alias also leaves the serving version in place.

Routes (JSON, on 127.0.0.1 by default):

* ``POST /invocations``: MLflow's scoring protocol (``dataframe_split``, ``dataframe_records``, ``inputs``,
  ``instances``); answers ``{"predictions": [...], "model": {"name", "version"}}`` with headers
  ``X-Model-Name`` / ``X-Model-Version`` naming the version that answered; a bad request is a 400 with the message.
* ``GET /ping`` (200 when a version serves, 503 before), ``GET /version`` (what serves, since when, the last
  reload failure), ``POST /mlflow-events`` (the webhook receiver).
"""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.registry.events import (
    ALIAS_EVENTS,
    EVENTS_PATH,
    JsonServer,
    RegistryEvent,
    Reply,
    WebhookEndpoint,
    ensure_webhook,
    event_route,
    remove_webhook,
)
from components.registry.rules import CHAMPION, utc_now


class ServeError(RuntimeError):
    """A version cannot serve (download, load or health check failed); the message says which and why."""


@dataclass(frozen=True)
class ServeConfig:
    """One ``vilbert serve``."""

    name: str
    """Registered model, e.g. ``vilbert-vqa``."""
    tracking_uri: str | None = None
    """Registry (default: ``$MLFLOW_TRACKING_URI``, else the project's sqlite store); webhooks need an ``http(s)://``
    ``mlflow server``."""
    alias: str = CHAMPION
    host: str = "127.0.0.1"
    port: int = 5001
    poll_s: float = 30.0
    """Check the alias this often as well (0: only on webhook events)."""
    webhook: bool = True
    """Subscribe to the server's alias events (an http(s) registry only)."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("a registered model name is required")
        if self.poll_s < 0:
            raise ValueError(f"poll_s must be >= 0, got {self.poll_s}")


@dataclass(frozen=True)
class Serving:
    """A loaded, checked version."""

    version: str
    model: Any
    task: str
    loaded_at: str


class ChampionService:
    """The version behind ``config.alias``, swapped when the alias moves (module docstring)."""

    def __init__(self, config: ServeConfig, log: Callable[[str], None] = print) -> None:
        from components.registry.rules import client_for

        self.config = config
        self.log = log
        self.client, self.uri = client_for(config.tracking_uri)
        self.current: Serving | None = None
        self.last_error: str | None = None
        self._reload = threading.Lock()
        self._stop = threading.Event()
        self._secret = secrets.token_urlsafe(32)
        self._webhook_name = f"vilbert-serve-{config.name}-{config.host}-{config.port}"
        self._work = Path(tempfile.mkdtemp(prefix="vilbert-serve-"))
        self.server = JsonServer({
            ("POST", "/invocations"): self._invocations,
            ("GET", "/ping"): lambda _h, _b: (200, {"status": "ok"}, {}) if self.current
            else (503, {"status": "no version serves yet"}, {}),
            ("GET", "/version"): lambda _h, _b: (200, self.status(), {}),
            ("POST", EVENTS_PATH): event_route(WebhookEndpoint(self._secret), self._on_event),
        }, config.host, config.port)  # fmt: skip

    # --- versions ---

    def resolve(self) -> str | None:
        """The version the alias points at now (None: no such alias)."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.config.name, self.config.alias).version)
        except MlflowException:
            return None

    def load(self, version: str) -> Serving:
        """Download, load and health-check ``version`` (:class:`ServeError` naming the step that failed)."""
        import mlflow.artifacts
        import mlflow.pyfunc

        from components.serving.bundle import example_frame
        from components.serving.predictor import OUTPUT_COLUMNS

        uri = f"models:/{self.config.name}/{version}"
        task = self.client.get_model_version(self.config.name, version).tags.get("task")
        if task not in OUTPUT_COLUMNS:
            raise ServeError(f"{uri} has no task tag naming one of {sorted(OUTPUT_COLUMNS)} (tag: {task!r})")
        path = list(sys.path)  # pyfunc prepends the model's code/ folder; this process keeps its own code
        try:
            target = tempfile.mkdtemp(prefix=f"v{version}-", dir=self._work)
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=target, tracking_uri=self.uri)
            model = mlflow.pyfunc.load_model(local)
        except Exception as exc:
            raise ServeError(f"{uri} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path[:] = path
        try:
            answer = model.predict(example_frame(task))
        except Exception as exc:
            raise ServeError(f"{uri} failed its health check: {type(exc).__name__}: {exc}") from exc
        missing = set(OUTPUT_COLUMNS[task]) - set(getattr(answer, "columns", []))
        if len(answer) != 1 or missing:
            raise ServeError(f"{uri} failed its health check: {len(answer)} rows for 1, missing columns "
                             f"{sorted(missing)}")  # fmt: skip
        return Serving(version, model, task, utc_now())

    def refresh(self, why: str) -> bool:
        """Load the alias's version if it is not the one serving; True when a new version took over."""
        with self._reload:
            version = self.resolve()
            if version is None or (self.current is not None and self.current.version == version):
                return False
            self.log(f"serve: {self.config.name}@{self.config.alias} is version {version} ({why}): loading")
            try:
                loaded = self.load(version)
            except ServeError as exc:
                self.last_error = str(exc)
                kept = f"version {self.current.version} keeps serving" if self.current else "nothing serves"
                self.log(f"serve: {exc}; {kept}")
                return False
            old, self.current, self.last_error = self.current, loaded, None  # one assignment: the swap
            self.log(f"serve: version {version} serves now" + (f" (was {old.version})" if old else ""))
            return True

    def status(self) -> dict[str, Any]:
        current = self.current
        return {"name": self.config.name, "alias": self.config.alias, "version": current and current.version,
                "task": current and current.task, "loaded_at": current and current.loaded_at,
                "last_error": self.last_error, "registry": self.uri}  # fmt: skip

    # --- requests ---

    def _invocations(self, headers: Mapping[str, str], body: bytes) -> Reply:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import infer_and_parse_data

        from components.serving.predictor import ServingInputError

        serving = self.current  # this request is answered by the version serving when it arrived
        if serving is None:
            return 503, {"error": f"no version of {self.config.name} serves yet (alias {self.config.alias})"}, {}
        try:
            frame = infer_and_parse_data(json.loads(body or b"{}"))
            answer = serving.model.predict(frame)
        except (MlflowException, ServingInputError, ValueError) as exc:
            code = getattr(exc, "error_code", "BAD_REQUEST")
            if isinstance(exc, MlflowException) and code not in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
                raise
            return 400, {"error_code": code, "message": getattr(exc, "message", str(exc))}, self._headers(serving)
        predictions = json.loads(answer.to_json(orient="records"))
        model = {"name": self.config.name, "version": serving.version}
        return 200, {"predictions": predictions, "model": model}, self._headers(serving)

    def _headers(self, serving: Serving) -> dict[str, str]:
        return {"X-Model-Name": self.config.name, "X-Model-Version": serving.version}

    def _on_event(self, event: RegistryEvent) -> dict[str, Any]:
        if event.name == self.config.name and event.alias == self.config.alias:
            threading.Thread(target=self.refresh, args=(f"webhook {event.kind}",), daemon=True).start()
            return {"reloading": True}
        return {"ignored": event.kind}

    # --- lifetime ---

    def start(self) -> ChampionService:
        self.server.start()
        if self.config.webhook and self.uri.startswith(("http://", "https://")):
            url = self.server.url + EVENTS_PATH
            ensure_webhook(self.client, self._webhook_name, url, self._secret, ALIAS_EVENTS)
            self.log(f"serve: subscribed to alias events of {self.uri} at {url}")
        self.refresh("start")
        if self.config.poll_s:
            threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()
        self.log(f"serve: {self.config.name}@{self.config.alias} on {self.server.url}/invocations")
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.refresh("poll")
            except Exception as exc:  # the registry is briefly unreachable: try again next time
                self.log(f"serve: poll failed: {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        import shutil

        self._stop.set()
        if self.config.webhook and self.uri.startswith(("http://", "https://")):
            try:
                remove_webhook(self.client, self._webhook_name)
            except Exception as exc:  # the server may already be gone
                self.log(f"serve: could not remove webhook {self._webhook_name}: {exc}")
        self.server.stop()
        shutil.rmtree(self._work, ignore_errors=True)
