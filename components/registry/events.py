"""Registry events: MLflow's webhooks call a receiver of ours, which audits every alias change.

An ``mlflow server`` with a SQL store (our sqlite default included) delivers webhooks: on each alias change it
POSTs ``{"entity": "model_version_alias", "action": "created" | "deleted", "timestamp": ..., "data": {"name",
"alias", "version"}}`` to the subscribed URL, signed with the webhook's secret (HMAC-SHA256 over
``<delivery id>.<unix time>.<body>``, header ``X-MLflow-Signature: v1,<base64>``).  :class:`WebhookEndpoint`
checks the signature and the time (a delivery older than :data:`MAX_AGE_S` or replayed is refused with 401) and
parses the event; :class:`JsonServer` is the small HTTP server on 127.0.0.1 that carries it (and, in
``vilbert serve``, the invocations route).

:class:`AliasAuditor` is what ``vilbert registry listen`` (started by ``make ui`` beside the UI) does with each
event, under the model's registry lock:

* every change is appended to the registered model's ``alias.history`` tag (JSON list, newest last): when, which
  alias, set or deleted, the version, the version that held the alias before (``alias.state`` keeps the last
  holder of each alias as the auditor saw it), who and why where known, and where it came from (``source``);
* a ``champion`` set outside ``vilbert promote`` / ``rollback`` (the MLflow UI, or any API client) is recorded
  as a promotion exactly as ``vilbert promote`` records one (components.registry.rules.adopt_champion): the old
  champion becomes ``previous-champion`` (so ``vilbert rollback`` undoes it), ``challenger`` is dropped from the
  promoted version, ``champion.*`` version tags and a ``champion.history`` entry with actor ``mlflow-ui`` and
  reason "set in the MLflow UI" (MLflow's webhook payload names no user, so the UI user is not known);
* a change no event reported (the listener was down, or MLflow still used its cached subscriber list) is found by
  :meth:`AliasAuditor.reconcile` (every few seconds: the aliases against ``alias.state``) and recorded the same way;
* the rules a new champion breaks (no evaluation, not passed by the gate, not comparable with or worse than the
  champion it replaces) are flagged on the version (tag ``rules.violations``), in the history entry and in the
  listener's log -- nothing is reverted.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from components.registry.rules import (
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,
    MAX_HISTORY_CHARS,
    PREVIOUS_CHAMPION,
    utc_now,
)

SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
EVENTS_PATH = "/mlflow-events"
LISTENER_WEBHOOK = "vilbert-registry-events"
ALIAS_HISTORY_TAG, ALIAS_STATE_TAG = "alias.history", "alias.state"
UI_ACTOR, UI_REASON, UI_SOURCE = "mlflow-ui", "set in the MLflow UI", "mlflow-ui"
MAX_AGE_S = 300  # a delivery signed longer ago than this is refused (replay protection)
RECONCILED = "reconciled"  # the delivery id of a change found by AliasAuditor.reconcile, not told by an event
RECENT_S = 120  # a champion.history entry this recent explains the alias moves that follow it


class SignatureError(ValueError):
    """A delivery without a valid signature, too old, or replayed."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for ``body``."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class RegistryEvent:
    """One webhook delivery."""

    entity: str
    action: str
    name: str
    alias: str | None
    version: str | None
    timestamp: str
    delivery_id: str

    @property
    def kind(self) -> str:
        return f"{self.entity}.{self.action}"


class WebhookEndpoint:
    """Verifies and parses deliveries signed with ``secret``."""

    def __init__(self, secret: str, max_age_s: float = MAX_AGE_S) -> None:
        if not secret:
            raise ValueError("a webhook receiver needs a secret")
        self.secret = secret
        self.max_age_s = max_age_s
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def parse(self, headers: Mapping[str, str], body: bytes) -> RegistryEvent:
        """The event of a delivery; :class:`SignatureError` when it is not signed with our secret, too old or seen."""
        lower = {k.lower(): v for k, v in headers.items()}
        delivery, stamp, given = (
            lower.get(h.lower()) or "" for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
        )
        if not (delivery and stamp and given):
            raise SignatureError("unsigned delivery (no signature, timestamp or delivery id)")
        if not hmac.compare_digest(sign(self.secret, delivery, stamp, body), given):
            raise SignatureError("bad signature")
        try:
            age = time.time() - int(stamp)
        except ValueError:
            raise SignatureError(f"bad timestamp {stamp!r}") from None
        if abs(age) > self.max_age_s:
            raise SignatureError(f"delivery signed {age:.0f} s ago (more than {self.max_age_s:g} s)")
        with self._lock:
            if delivery in self._seen:
                raise SignatureError(f"delivery {delivery} was already received")
            self._seen[delivery] = None
            while len(self._seen) > 10_000:
                self._seen.popitem(last=False)
        payload = json.loads(body)
        data = payload.get("data") or {}
        version = data.get("version")
        return RegistryEvent(str(payload.get("entity")), str(payload.get("action")), str(data.get("name")),
                             data.get("alias"), None if version is None else str(version),
                             str(payload.get("timestamp") or utc_now()), delivery)  # fmt: skip


# --- a small JSON server on loopback ------------------------------------------------------------------------

Reply = tuple[int, Any, dict[str, str]]
Route = Callable[[Mapping[str, str], bytes], Reply]


class JsonServer:
    """A threading HTTP server answering JSON on ``(method, path)`` routes (a route gets the request headers, names
    in lower case, and the body); ``port=0`` picks a free port."""

    def __init__(self, routes: Mapping[tuple[str, str], Route], host: str = "127.0.0.1", port: int = 0) -> None:
        table = dict(routes)

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                route = table.get((method, self.path.split("?", 1)[0]))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                extra: dict[str, str] = {}
                if route is None:
                    status, data = 404, {"error": f"no route {method} {self.path}"}
                else:
                    try:
                        status, data, extra = route({k.lower(): v for k, v in self.headers.items()}, body)
                    except Exception as exc:  # an answer, never a dropped connection
                        status, data, extra = 500, {"error": f"{type(exc).__name__}: {exc}"}, {}
                out = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self) -> None:  # noqa: N802 (http.server's names)
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise here
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> JsonServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="json-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def event_route(endpoint: WebhookEndpoint, handle: Callable[[RegistryEvent], Any]) -> Route:
    """A route that verifies a delivery (401 otherwise) and answers what ``handle`` returns for its event."""

    def route(headers: Mapping[str, str], body: bytes) -> Reply:
        try:
            event = endpoint.parse(headers, body)
        except SignatureError as exc:
            return 401, {"error": str(exc)}, {}
        return 200, handle(event), {}

    return route


# --- webhooks in the registry ---------------------------------------------------------------------------------


def ensure_webhook(client: Any, name: str, url: str, secret: str, events: tuple[str, ...] = ALIAS_EVENTS) -> str:
    """Create or update the webhook ``name`` (URL, events, secret, active); returns its id.  The store must be an
    ``mlflow server`` (it delivers) that allows loopback http URLs (see components.registry.ui.server_env)."""
    found = find_webhook(client, name)
    if found is None:
        return str(client.create_webhook(name=name, url=url, events=list(events), secret=secret,
                                         description="vilbert: audits alias changes / follows the champion").webhook_id)  # fmt: skip
    client.update_webhook(found, url=url, events=list(events), secret=secret, status="ACTIVE")
    return found


def find_webhook(client: Any, name: str) -> str | None:
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        for hook in page:
            if hook.name == name:
                return str(hook.webhook_id)
        token = page.token
        if not token:
            return None


def remove_webhook(client: Any, name: str) -> None:
    found = find_webhook(client, name)
    if found is not None:
        client.delete_webhook(found)


# --- the auditor ----------------------------------------------------------------------------------------------


@dataclass
class AliasRecord:
    """One alias change as ``alias.history`` keeps it."""

    at: str
    """When MLflow sent the event (UTC ISO 8601)."""
    name: str
    alias: str
    action: str
    """``set`` or ``deleted``."""
    version: str | None
    previous: str | None
    """The version that held the alias before (as the auditor last saw it; None: none or unknown)."""
    source: str
    """``mlflow-ui`` (the UI or any other client), ``vilbert promote`` / ``rollback`` / ``register``, ``vilbert
    registry listen`` (the auditor's own moves), or ``superseded`` (the alias had moved on when it arrived)."""
    actor: str | None = None
    reason: str | None = None
    violations: list[str] = field(default_factory=list)
    delivery_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AliasAuditor:
    """Records alias events in the registry (module docstring); one event at a time."""

    def __init__(self, client: Any, log: Callable[[str], None] = print) -> None:
        self.client = client
        self.log = log
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)
        self._lock = threading.Lock()

    def bootstrap(self) -> None:
        """Give every registered model without an ``alias.state`` tag one (its current aliases), so that the first
        change recorded knows the previous holder."""
        from components.registry.lock import is_lock

        for model in self.client.search_registered_models(max_results=1000):
            if not is_lock(model.name) and ALIAS_STATE_TAG not in model.tags:
                state = {k: str(v) for k, v in model.aliases.items()}
                self.client.set_registered_model_tag(model.name, ALIAS_STATE_TAG, json.dumps(state))

    def reconcile(self) -> int:
        """Audit the alias changes no event told us about (made while the listener was down, or in the seconds in
        which the server still used its cached list of subscribers): every alias whose holder differs from
        ``alias.state`` is handled as an event of now.  Returns how many were found."""
        from components.registry.lock import is_lock

        found = 0
        for model in self.client.search_registered_models(max_results=1000):
            if is_lock(model.name):
                continue
            state = json.loads(model.tags.get(ALIAS_STATE_TAG) or "{}")  # none yet: created after bootstrap
            now = {k: str(v) for k, v in model.aliases.items()}
            for alias in sorted(set(state) | set(now), key=lambda a: a != CHAMPION):  # champion first
                if state.get(alias) != now.get(alias):
                    action = "deleted" if alias not in now else "created"
                    found += "recorded_already" not in self.handle(RegistryEvent(
                        "model_version_alias", action, model.name, alias, now.get(alias), utc_now(), RECONCILED))  # fmt: skip
        return found

    def handle(self, event: RegistryEvent) -> dict[str, Any]:
        """Audit one event; returns the record (also kept in :attr:`records`)."""
        from components.registry.lock import is_lock, registry_lock

        if event.entity != "model_version_alias" or not event.alias or is_lock(event.name):
            return {"ignored": event.kind}
        with self._lock, registry_lock(self.client, event.name):
            record = self._audit(event)
        if record is None:
            return {"recorded_already": event.kind}
        self.records.append(record.to_dict())
        line = (f"registry: {record.name} @{record.alias} {record.action} -> {record.version} (was {record.previous};"
                f" {record.source}{', ' + record.actor if record.actor else ''})")  # fmt: skip
        self.log(line)
        for problem in record.violations:
            self.log(f"registry: RULE BROKEN by {record.name} version {record.version}: {problem}")
        return record.to_dict()

    def _audit(self, event: RegistryEvent) -> AliasRecord | None:
        from components.registry.rules import adopt_champion

        model = self.client.get_registered_model(event.name)
        now = {k: str(v) for k, v in model.aliases.items()}
        state: dict[str, str] = json.loads(model.tags.get(ALIAS_STATE_TAG) or "{}")
        history = json.loads(model.tags.get(HISTORY_TAG) or "[]")
        last = history[-1] if history else None
        alias, deleted = event.alias or "", event.action == "deleted"
        version = None if deleted else event.version
        if state.get(alias) == version and now.get(alias) == version:
            return None  # recorded already (a repeated delivery, or the reconciliation got there first)
        if event.delivery_id == RECONCILED and now.get(alias) != version:
            return None  # it moved on while the reconciliation looked: the next look sees where it went
        record = AliasRecord(event.timestamp, event.name, alias, "deleted" if deleted else "set", version,
                             state.get(alias), self._source(event.name, alias, version, deleted, state, history[-5:]),
                             delivery_id=event.delivery_id)  # fmt: skip
        if now.get(alias) != version:
            record.source = "superseded"  # it moved again (or back) since: the later event records that
        elif alias == CHAMPION and deleted:
            record.violations = [f"champion removed: models:/{event.name}@champion resolves to nothing (serving "
                                 "keeps the version it has)"]  # fmt: skip
        elif alias == CHAMPION and version is not None:
            if last is not None and str(last.get("champion")) == version and _recent(last):
                record.source, record.actor, record.reason = f"vilbert {last['action']}", last["actor"], last["reason"]
                record.violations = list(last.get("violations") or [])
            else:
                old = record.previous if record.previous != version else None
                if old is None and last is not None and str(last.get("champion")) != version:
                    old = str(last["champion"])  # no state for it yet: the last champion recorded
                if old is not None and not self._exists(event.name, old):
                    old = None
                change = adopt_champion(self.client, event.name, version, old, UI_ACTOR, UI_REASON, UI_SOURCE)
                record.previous, record.actor, record.reason = old, change.actor, change.reason
                record.violations = list(change.violations)  # its own moves arrive as events of their own
        if record.source != "superseded":
            if version is None:
                state.pop(alias, None)
            else:
                state[alias] = version
        self._write(event.name, state, record)
        return record

    def _source(self, name: str, alias: str, version: str | None, deleted: bool, state: Mapping[str, str],
                recent: list[Mapping[str, Any]]) -> str:  # fmt: skip
        """Who moved a non-champion alias, as far as the registry tells (a champion move is decided in _audit)."""
        for move in reversed([m for m in recent if _recent(m)]):  # events can arrive after the next move was made
            by = "vilbert registry listen" if move.get("source") == UI_SOURCE else f"vilbert {move['action']}"
            if alias == PREVIOUS_CHAMPION and not deleted and version == str(move.get("replaced")):
                return by
            if alias == PREVIOUS_CHAMPION and deleted and move.get("action") == "rollback":
                return by
            if alias == CHALLENGER and deleted and state.get(CHALLENGER) == str(move.get("champion")):
                return by
        if alias == CHALLENGER and not deleted and version is not None:
            tags = self.client.get_model_version(name, version).tags
            if tags.get("gate.decision") == CHALLENGER:
                return "vilbert register"
        return UI_SOURCE

    def _exists(self, name: str, version: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(name, version)
            return True
        except MlflowException:
            return False

    def _write(self, name: str, state: Mapping[str, str], record: AliasRecord) -> None:
        self.client.set_registered_model_tag(name, ALIAS_STATE_TAG, json.dumps(dict(state), sort_keys=True))
        current = self.client.get_registered_model(name).tags.get(ALIAS_HISTORY_TAG)
        history = json.loads(current) if current else []
        history.append(record.to_dict())
        while len(json.dumps(history)) > MAX_HISTORY_CHARS and len(history) > 1:
            history.pop(0)
        self.client.set_registered_model_tag(name, ALIAS_HISTORY_TAG, json.dumps(history))


def _recent(entry: Mapping[str, Any]) -> bool:
    try:
        at = dt.datetime.fromisoformat(str(entry.get("at")))
    except ValueError:
        return False
    return (dt.datetime.now(dt.UTC) - at).total_seconds() < RECENT_S
