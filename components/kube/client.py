"""The few Kubernetes API calls that launching a PyTorchJob needs, through the official ``kubernetes`` client.

Each method of :class:`KubernetesJobApi` is one request, and each request is allowed by one rule of the Role
``vilbert-pipeline`` (infra/k8s/base/rbac.yaml): pytorchjobs create/get/delete, pods list, pods/log get, events
list.  ``connect()`` loads the in-cluster configuration (a pipeline step's service account), else the kubeconfig.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
#: Label the Training Operator v1 puts on every pod of a job (kubeflow.org/v1 JobNameLabel).
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
#: The namespace of an in-cluster pod's service account.
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: A kubelet log timestamp (RFC3339 with up to 9 fraction digits, trailing zeros trimmed) and the line.
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ?(.*)$")


class KubeError(RuntimeError):
    """The Kubernetes API cannot be reached or refused a request; the message says why and what to check."""


class ApiStatusError(KubeError):
    """The API server answered with an error status (``status``: 403, 404, 409, 5xx...)."""

    def __init__(self, status: int, reason: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status} {reason}")
        self.status = status


@dataclass(frozen=True)
class PodInfo:
    """A pod of the job, as far as following it needs."""

    name: str
    """Pod name, e.g. ``<job>-worker-0``."""
    uid: str
    """Changes when the operator recreates the pod under the same name."""
    phase: str
    """Pending, Running, Succeeded, Failed or Unknown."""


@dataclass(frozen=True)
class EventInfo:
    """A Warning event about the job or one of its pods (unschedulable, image pull failure, restarts...)."""

    key: str
    """Identity of this occurrence (uid and repeat count)."""
    object_name: str
    """Name of the object the event is about."""
    reason: str
    """Machine-readable reason, e.g. FailedScheduling."""
    message: str
    """Human-readable message."""


class JobApi(Protocol):
    """What ``run_pytorchjob`` calls; :class:`KubernetesJobApi` is the real one (tests replay a cluster)."""

    default_namespace: str

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def get_job(self, namespace: str, name: str) -> dict[str, Any]: ...
    def delete_job(self, namespace: str, name: str) -> None: ...
    def list_pods(self, namespace: str, job: str) -> list[PodInfo]: ...
    def read_log(self, namespace: str, pod: str, since_seconds: int | None) -> str: ...
    def warning_events(self, namespace: str) -> list[EventInfo]: ...


def connect() -> tuple[Any, str]:
    """An ``ApiClient`` and the default namespace: in-cluster config first, then the kubeconfig.

    Nothing global is changed (no default configuration is set). Raises KubeError when neither works.
    """
    from kubernetes import client, config

    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        namespace = _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.is_file() else "default"
        return client.ApiClient(configuration), namespace
    except config.ConfigException as in_cluster:
        reason = str(in_cluster)
    # Read KUBECONFIG now: the client reads it once, at import time.
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    try:
        api_client = config.new_client_from_config(config_file=kubeconfig, persist_config=False)
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError, TypeError, KeyError) as exc:
        raise KubeError(
            "no Kubernetes configuration: not running in a cluster "
            f"({reason}) and no usable kubeconfig ({exc}); set KUBECONFIG or run inside the cluster"
        ) from None
    return api_client, (active or {}).get("context", {}).get("namespace") or "default"


def log_timestamp(line: str) -> tuple[tuple[float, int], str] | None:
    """(sortable timestamp, text) of a line read with ``timestamps=true``; None when the line has none."""
    match = _LOG_LINE.match(line)
    if match is None:
        return None
    base, fraction, zone, text = match.groups()
    seconds = dt.datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    return (seconds, int((fraction or "0").ljust(9, "0"))), text


class KubernetesJobApi:
    """:class:`JobApi` with the official client: CustomObjectsApi for the job, CoreV1Api for pods, logs, events."""

    def __init__(self, api_client: Any = None, default_namespace: str = "default") -> None:
        from kubernetes import client

        self.default_namespace = default_namespace
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    @classmethod
    def from_environment(cls) -> KubernetesJobApi:
        """Connected as :func:`connect` says (in-cluster, else kubeconfig)."""
        api_client, namespace = connect()
        return cls(api_client, namespace)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One request; API errors become ApiStatusError, connection problems KubeError."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise ApiStatusError(exc.status or 0, _api_message(exc), what) from None
        except (HTTPError, OSError) as exc:
            raise KubeError(f"{what}: cannot reach the API server: {exc}") from None

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST the PyTorchJob; returns it as stored."""
        create = self._custom.create_namespaced_custom_object
        return self._call(f"create pytorchjob in {namespace}", create, GROUP, VERSION, namespace, PLURAL, body)

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        """GET the PyTorchJob (with its status)."""
        get = self._custom.get_namespaced_custom_object
        return self._call(f"get pytorchjob {namespace}/{name}", get, GROUP, VERSION, namespace, PLURAL, name)

    def delete_job(self, namespace: str, name: str) -> None:
        """DELETE the PyTorchJob; its pods and Services go with it (owner references)."""
        delete = self._custom.delete_namespaced_custom_object
        what = f"delete pytorchjob {namespace}/{name}"
        self._call(what, delete, GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background")

    def list_pods(self, namespace: str, job: str) -> list[PodInfo]:
        """The job's pods, found by the operator's job-name label."""
        pods = self._call(
            f"list pods of {namespace}/{job}",
            self._core.list_namespaced_pod,
            namespace,
            label_selector=f"{JOB_NAME_LABEL}={job}",
        )
        return [
            PodInfo(p.metadata.name, p.metadata.uid, (p.status.phase if p.status else None) or "Unknown")
            for p in pods.items
        ]

    def read_log(self, namespace: str, pod: str, since_seconds: int | None) -> str:
        """The ``pytorch`` container's log with timestamps (the last ``since_seconds`` only, when given).

        At most 4 MiB per read: a pod that logs more than that between two polls loses the excess from the
        follower's output (never from the pod's log itself)."""
        kwargs: dict[str, Any] = {"container": "pytorch", "timestamps": True, "limit_bytes": 4 << 20}
        if since_seconds is not None:
            kwargs["since_seconds"] = max(1, since_seconds)
        # Raw bytes, decoded leniently: a worker's output need not be valid UTF-8.
        response = self._call(
            f"read log of {namespace}/{pod}",
            self._core.read_namespaced_pod_log,
            pod,
            namespace,
            _preload_content=False,
            **kwargs,
        )
        return response.data.decode("utf-8", errors="replace")

    def warning_events(self, namespace: str) -> list[EventInfo]:
        """Warning events of the namespace (the caller keeps those about its job and pods)."""
        events = self._call(
            f"list events in {namespace}", self._core.list_namespaced_event, namespace, field_selector="type=Warning"
        )
        return [
            EventInfo(
                f"{e.metadata.uid}/{e.count or 1}",
                e.involved_object.name or "",
                e.reason or "",
                (e.message or "").strip(),
            )
            for e in events.items
        ]


def _api_message(exc: Any) -> str:
    """The Status message of an API error body, else its HTTP reason."""
    import json

    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
