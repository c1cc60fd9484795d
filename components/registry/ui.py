"""``make ui``: the MLflow UI (an ``mlflow server`` on the local store) with the registry-event listener beside it.

:func:`run_ui` starts ``mlflow server`` on 127.0.0.1 with webhooks enabled for a loopback receiver
(:func:`server_env`), then :class:`Listener` (components/registry/events.py) on another loopback port, which
subscribes to the server's alias events with an HMAC secret.  The secret and the key MLflow encrypts webhook
secrets with are kept per store in a state file outside the checkout (``$XDG_STATE_HOME/vilbert/``, mode 0600), so
a restarted UI reads the webhooks it stored before.  ``vilbert registry listen`` runs the listener alone, against
an ``mlflow server`` started elsewhere (that server needs the same environment: :func:`server_env`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from components.registry.events import (
    EVENTS_PATH,
    LISTENER_WEBHOOK,
    AliasAuditor,
    JsonServer,
    WebhookEndpoint,
    ensure_webhook,
    event_route,
    remove_webhook,
)

ENCRYPTION_KEY_ENV = "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"


def server_env(encryption_key: str) -> dict[str, str]:
    """What ``mlflow server`` needs to deliver webhooks to a receiver on 127.0.0.1: http and private addresses
    allowed (MLflow refuses both by default: SSRF protection), one stable key for the stored secrets (otherwise
    each worker makes its own and cannot read the others'), and a short webhook cache (a receiver subscribed
    after the server started is called within seconds)."""
    return {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            ENCRYPTION_KEY_ENV: encryption_key, "MLFLOW_WEBHOOK_CACHE_TTL": "2",
            "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip


def default_state_file(store_uri: str) -> Path:
    """Where the webhook secret and encryption key of ``store_uri`` are kept (outside the checkout)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "vilbert"
    return base / f"registry-events-{hashlib.sha256(store_uri.encode()).hexdigest()[:12]}.json"


def load_state(path: Path) -> dict[str, str]:
    """``{"secret", "encryption_key"}`` from ``path``, made (mode 0600) the first time."""
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("secret") and state.get("encryption_key"):
            return state
    from cryptography.fernet import Fernet

    state = {"secret": secrets.token_urlsafe(32), "encryption_key": Fernet.generate_key().decode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state) + "\n")
    return state


def start_mlflow_server(store_uri: str, host: str, port: int, env: Mapping[str, str], log_file: Path,
                        artifacts: str | None = None, cwd: Path | None = None) -> subprocess.Popen:  # fmt: skip
    """``mlflow server`` in its own process group (stop it with :func:`stop_process`); returns when it answers."""
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--backend-store-uri", store_uri, "--host", host, "--port", str(port),
           "--workers", "1"]  # fmt: skip
    if artifacts:
        cmd += ["--artifacts-destination", artifacts]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)  # fmt: skip
    try:
        wait_until_up(f"http://{host}:{port}/health", proc, log_file)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def wait_until_up(url: str, proc: subprocess.Popen | None = None, log_file: Path | None = None,
                  timeout_s: float = 120.0) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text()[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"the server exited ({proc.returncode}) before answering {url}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:g} s")
        time.sleep(0.3)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group ``proc`` leads (it was started with ``start_new_session``), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass


class Listener:
    """The registry-event listener: a loopback receiver subscribed to the server's alias events."""

    def __init__(self, tracking_uri: str, secret: str, host: str = "127.0.0.1", port: int = 0,
                 log: Callable[[str], None] = print, reconcile_s: float = 3.0) -> None:  # fmt: skip
        from components.registry.rules import client_for

        self.client, self.uri = client_for(tracking_uri)
        self.auditor = AliasAuditor(self.client, log)
        endpoint = WebhookEndpoint(secret)
        self.server = JsonServer({
            ("POST", EVENTS_PATH): event_route(endpoint, self.auditor.handle),
            ("GET", "/health"): lambda _h, _b: (200, {"status": "ok"}, {}),
            ("GET", "/events"): lambda _h, _b: (200, list(self.auditor.records), {}),
        }, host, port)  # fmt: skip
        self.secret = secret
        self.log = log
        self.reconcile_s = reconcile_s
        self._stop = threading.Event()

    def start(self) -> Listener:
        self.auditor.bootstrap()
        self.server.start()
        ensure_webhook(self.client, LISTENER_WEBHOOK, self.server.url + EVENTS_PATH, self.secret)
        self.log(f"registry: listening for alias events of {self.uri} on {self.server.url}{EVENTS_PATH}")
        threading.Thread(target=self._reconcile, name="alias-reconcile", daemon=True).start()
        return self

    def _reconcile(self) -> None:
        """Every ``reconcile_s``: the changes no event reported (components.registry.events.AliasAuditor.reconcile)."""
        while not self._stop.wait(self.reconcile_s):
            try:
                missed = self.auditor.reconcile()
            except Exception as exc:  # the server is briefly unreachable: next time
                self.log(f"registry: reconciliation failed: {type(exc).__name__}: {exc}")
                continue
            if missed:
                self.log(f"registry: {missed} alias change(s) arrived without an event; recorded")

    def stop(self) -> None:
        """Unsubscribe (the server would call a closed port otherwise), then close the receiver."""
        self._stop.set()
        try:
            remove_webhook(self.client, LISTENER_WEBHOOK)
        except Exception as exc:  # the server may be gone already (make ui stops it right after)
            self.log(f"registry: could not remove webhook {LISTENER_WEBHOOK}: {type(exc).__name__}: {exc}")
        self.server.stop()


def run_ui(store_uri: str, host: str = "127.0.0.1", port: int = 5000, listen_port: int = 5005,
           state_file: Path | None = None, log: Callable[[str], None] = print) -> None:  # fmt: skip
    """The UI and the listener until Ctrl-C (or the server exits); both are stopped on the way out."""
    state = load_state(state_file or default_state_file(store_uri))
    _sigterm_as_interrupt()
    log_file = Path(os.environ.get("VILBERT_UI_LOG", "mlruns/mlflow-server.log"))
    server = start_mlflow_server(store_uri, host, port, server_env(state["encryption_key"]), log_file)
    listener = None
    try:
        listener = Listener(f"http://{host}:{port}", state["secret"], host, listen_port, log).start()
        log(f"MLflow UI on http://{host}:{port} (server log: {log_file}); promotions made there are audited")
        while server.poll() is None:
            time.sleep(0.5)
        log(f"the MLflow server exited ({server.returncode}); see {log_file}")
    except KeyboardInterrupt:
        pass
    finally:
        if listener is not None:
            listener.stop()
        stop_process(server)


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a service manager, a test) stops the UI as Ctrl-C does: listener unsubscribed, server stopped."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread: whoever runs it there handles signals
        signal.signal(signal.SIGTERM, interrupt)
