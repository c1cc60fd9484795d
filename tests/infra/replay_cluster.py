"""A scripted stand-in for the Kubernetes API server, for testing the PyTorchJob launcher without a cluster.

THIS IS NOT A CLUSTER. There is no scheduler, no Training Operator, no pod and no container: a loopback HTTP
server answers the few REST paths that ``components.kube.client.KubernetesJobApi`` calls (through the real
``kubernetes`` client) with what a test scripted: one :class:`Frame` per poll of the job, each holding the
job's ``status`` (conditions built by :class:`OperatorStatus`, which applies the Training Operator v1's rules for
setting conditions, pkg/util/status.go, with the reasons and messages its PyTorchJob controller writes), the
pods, their logs (kubelet format: RFC3339Nano timestamp, space, line) and Warning events. What it shows is that
the launcher reads real-format objects correctly and reacts to each sequence as it should; not that a cluster
behaves like the script.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

T0 = "2026-03-01T12:00:00Z"


def at(seconds: int) -> str:
    """A metav1.Time (RFC3339, whole seconds, UTC) ``seconds`` after T0."""
    return f"2026-03-01T12:{seconds // 60:02d}:{seconds % 60:02d}Z"


def log_line(seconds: float, text: str) -> str:
    """A line as the kubelet returns it with ``timestamps=true`` (RFC3339Nano, trailing zeros trimmed)."""
    whole, frac = int(seconds), round((seconds % 1) * 1e9)
    fraction = f".{frac:09d}".rstrip("0") if frac else ""
    return f"2026-03-01T12:{whole // 60:02d}:{whole % 60:02d}{fraction}Z {text}"


class OperatorStatus:
    """``status.conditions`` evolving as the Training Operator v1 sets them (pkg/util/status.go, setCondition):
    nothing changes after Failed; an unchanged (type, status, reason) is not re-added; Running and Restarting
    replace each other; Succeeded or Failed turn Running to False; the new condition is appended last."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.conditions: list[dict[str, Any]] = []

    def set(self, kind: str, t: int, message: str | None = None) -> list[dict[str, Any]]:
        """Set condition ``kind`` at time ``t`` with the controller's message; returns a copy of the list."""
        if any(c["type"] == "Failed" and c["status"] == "True" for c in self.conditions):
            return self.snapshot()
        messages = {  # the PyTorchJob controller's wording (Worker-only job), release-1.9
            "Created": f"PyTorchJob {self.name} is created.",
            "Running": f"PyTorchJob {self.namespace}/{self.name} is running.",
            "Restarting": f"PyTorchJob {self.name} is restarting because 1 Worker replica(s) failed.",
            "Succeeded": f"PyTorchJob {self.namespace}/{self.name} successfully completed.",
            "Failed": f"PyTorchJob {self.name} is failed because 1 Worker replica(s) failed.",
        }
        new = {
            "type": kind,
            "status": "True",
            "reason": f"PyTorchJob{kind}",
            "message": message or messages[kind],
            "lastUpdateTime": at(t),
            "lastTransitionTime": at(t),
        }
        current = next((c for c in self.conditions if c["type"] == kind), None)
        if current and current["status"] == "True" and current["reason"] == new["reason"]:
            return self.snapshot()
        kept = []
        for c in self.conditions:
            if {c["type"], kind} == {"Running", "Restarting"} or c["type"] == kind:
                continue
            if kind in ("Failed", "Succeeded") and c["type"] == "Running":
                c = {**c, "status": "False"}
            kept.append(c)
        self.conditions = [*kept, new]
        return self.snapshot()

    def snapshot(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.conditions]


@dataclass
class Frame:
    """What the API shows at one poll of the job."""

    conditions: list[dict[str, Any]]
    """``status.conditions`` of the job."""
    replica_statuses: dict[str, Any] = field(default_factory=dict)
    """``status.replicaStatuses``, e.g. {"Worker": {"active": 2}}."""
    pods: list[tuple[str, str, str]] = field(default_factory=list)
    """(name, uid, phase) of the job's pods."""
    logs: dict[str, list[str]] = field(default_factory=dict)
    """Pod uid -> its whole log so far (the server ignores sinceSeconds: the client must drop repeats)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Core v1 Events in the namespace (the server applies the type= field selector)."""
    job_error: int | None = None
    """Answer this poll's GET of the job with this HTTP status instead."""


def event(uid: str, kind: str, obj: str, reason: str, message: str, type_: str = "Warning", count: int = 1) -> dict:
    """A core v1 Event as the API returns it."""
    return {
        "metadata": {"name": f"{obj}.{uid}", "namespace": "vilbert", "uid": uid},
        "involvedObject": {"kind": kind, "name": obj, "namespace": "vilbert"},
        "reason": reason,
        "message": message,
        "type": type_,
        "count": count,
        "firstTimestamp": T0,
        "lastTimestamp": T0,
    }


class ReplayCluster:
    """Serves the scripted frames on 127.0.0.1; ``requests`` records (method, path, query) of every call."""

    def __init__(self, frames: list[Frame], create_error: int | None = None, delete_error: int | None = None):
        self.frames, self.create_error, self.delete_error = frames, create_error, delete_error
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.created: dict[str, Any] | None = None
        self.deleted = False
        self.polls = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ReplayCluster:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def api(self, namespace: str = "vilbert") -> Any:
        """The launcher's real API adapter, with the official client pointed at this server."""
        from kubernetes import client

        from components.kube.client import KubernetesJobApi

        configuration = client.Configuration()
        configuration.host = self.url
        return KubernetesJobApi(client.ApiClient(configuration), default_namespace=namespace)

    @property
    def frame(self) -> Frame:
        return self.frames[min(max(self.polls - 1, 0), len(self.frames) - 1)]

    def _answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        with self._lock:
            self.requests.append((method, path, query))
            if parts[:3] == ["apis", "kubeflow.org", "v1"] and parts[5:6] == ["pytorchjobs"]:
                return self._job(method, parts[6] if len(parts) > 6 else None, body)
            if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"] and len(parts) == 5:
                selector = query.get("labelSelector", [""])[0]
                name = (self.created or {}).get("metadata", {}).get("name")
                pods = self.frame.pods if selector == f"training.kubeflow.org/job-name={name}" else []
                return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [_pod(*p) for p in pods]}
            if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"] and parts[6:] == ["log"]:
                uid = next((uid for name, uid, _ in self.frame.pods if name == parts[5]), None)
                if uid is None:
                    return 404, _status(404, f'pods "{parts[5]}" not found')
                return 200, "".join(line + "\n" for line in self.frame.logs.get(uid, []))
            if parts[:2] == ["api", "v1"] and parts[4:5] == ["events"]:
                wanted = query.get("fieldSelector", [""])[0].removeprefix("type=")
                items = [e for e in self.frame.events if not wanted or e["type"] == wanted]
                return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items}
        return 404, _status(404, f"the server could not find the requested resource ({path})")

    def _job(self, method: str, name: str | None, body: Any) -> tuple[int, Any]:
        if method == "POST":
            if self.create_error:
                return self.create_error, _status(self.create_error, "refused by the script")
            self.created = {**body, "metadata": {**body["metadata"], "uid": "job-uid-1", "creationTimestamp": T0}}
            return 201, self.created
        if self.created is None or name != self.created["metadata"]["name"] or self.deleted:
            return 404, _status(404, f'pytorchjobs.kubeflow.org "{name}" not found')
        if method == "DELETE":
            if self.delete_error:
                return self.delete_error, _status(self.delete_error, "refused by the script")
            self.deleted = True
            return 200, _status(200, "deleted")
        self.polls += 1
        if self.frame.job_error:
            return self.frame.job_error, _status(self.frame.job_error, "scripted error")
        status = {"conditions": self.frame.conditions, "replicaStatuses": self.frame.replica_statuses}
        if self.frame.conditions:
            status["startTime"] = T0
        return 200, {**self.created, "status": status}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, payload = cluster._answer(self.command, url.path, parse_qs(url.query), body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        return Handler


def _pod(name: str, uid: str, phase: str) -> dict[str, Any]:
    labels = {
        "training.kubeflow.org/job-name": name.rsplit("-worker-", 1)[0],
        "training.kubeflow.org/replica-type": "worker",
    }
    return {
        "metadata": {"name": name, "uid": uid, "namespace": "vilbert", "labels": labels},
        "status": {"phase": phase},
    }


def _status(code: int, message: str) -> dict[str, Any]:
    reason = {200: "", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists", 503: "ServiceUnavailable"}.get(code, "")
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Success" if code < 300 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def rbac_needs(requests: list[tuple[str, str, dict[str, list[str]]]]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) that RBAC checks for each recorded (namespaced) request."""
    needs = set()
    for method, path, _ in requests:
        parts = path.strip("/").split("/")
        # /apis/<group>/<version>/namespaces/<ns>/<resource>[/<name>[/<sub>]], /api/v1/namespaces/<ns>/...
        group, rest = (parts[1], parts[5:]) if parts[0] == "apis" else ("", parts[4:])
        resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        verb = {"POST": "create", "DELETE": "delete"}.get(method) or ("get" if len(rest) > 1 else "list")
        needs.add((group, resource, verb))
    return needs
