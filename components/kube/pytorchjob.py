"""Run training as a Kubeflow Training Operator PyTorchJob and follow it to the end: the ``pytorchjob`` launcher.

``run_pytorchjob(spec)`` creates the job (``build_pytorchjob``), then polls it: ``.status.conditions`` as the
operator writes them (Created, Running, Restarting, Succeeded, Failed; a job is over when Succeeded or Failed is
True), the workers' logs (pods labelled ``training.kubeflow.org/job-name=<name>``, printed once each, prefixed
with the replica) and Warning events about the job and its pods.  Success returns a :class:`JobOutcome`; failure
raises :class:`PyTorchJobFailed` with the operator's reason and message and the tail of the logs; past
``spec.timeout_s`` the job is deleted and :class:`PyTorchJobTimeout` is raised.  Inside each worker,
``torchrun`` (started by the container command) runs ``spec.command``; ``components.training.launch`` sees that
it is already a torchrun worker and trains in-process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .client import ApiStatusError, JobApi, KubeError, KubernetesJobApi, log_timestamp
from .pytorchjob_manifest import TemplateMismatch, build_pytorchjob, build_template, spec_from_template
from .pytorchjob_spec import TEMPLATE_NAME, PvcMount, PyTorchJobSpec, PyTorchJobSpecError, Toleration

__all__ = [
    "TEMPLATE_NAME",
    "JobOutcome",
    "PvcMount",
    "PyTorchJobError",
    "PyTorchJobFailed",
    "PyTorchJobSpec",
    "PyTorchJobSpecError",
    "PyTorchJobTimeout",
    "TemplateMismatch",
    "Toleration",
    "build_pytorchjob",
    "build_template",
    "fetch_template",
    "run_pytorchjob",
    "spec_from_template",
]

#: Consecutive failed API calls (5xx, 429, connection errors) tolerated while following, before giving up.
MAX_API_ERRORS = 5


class PyTorchJobError(RuntimeError):
    """The job could not be created or followed (API refused, job deleted by someone else, no cluster...)."""


class PyTorchJobFailed(PyTorchJobError):
    """The operator marked the job Failed; carries its reason, message and the last lines of the workers' logs."""

    def __init__(self, name: str, reason: str, message: str, log_tail: tuple[str, ...], events: tuple[str, ...]):
        lines = [f"PyTorchJob {name} failed: {reason}: {message}"]
        if events:
            lines += ["warning events:", *(f"  {e}" for e in events)]
        lines += [f"last {len(log_tail)} log lines:", *(f"  {line}" for line in log_tail)] if log_tail else []
        super().__init__("\n".join(lines))
        self.name, self.reason, self.message, self.log_tail, self.events = name, reason, message, log_tail, events


class PyTorchJobTimeout(PyTorchJobError):
    """The job did not finish within ``timeout_s``; it was deleted."""

    def __init__(self, name: str, timeout_s: float, state: str, log_tail: tuple[str, ...], events: tuple[str, ...]):
        lines = [f"PyTorchJob {name} did not finish within {timeout_s:g} s (last state: {state}); deleted it"]
        if events:
            lines += ["warning events:", *(f"  {e}" for e in events)]
        lines += [f"last {len(log_tail)} log lines:", *(f"  {line}" for line in log_tail)] if log_tail else []
        super().__init__("\n".join(lines))
        self.name, self.state, self.log_tail, self.events = name, state, log_tail, events


@dataclass(frozen=True)
class JobOutcome:
    """A PyTorchJob that succeeded, as it was followed."""

    name: str
    """Job name."""
    namespace: str
    """Job namespace."""
    conditions: tuple[tuple[str, str, str], ...]
    """Every condition seen becoming current, in order: (type, reason, message)."""
    restarts_seen: int
    """Times the job was seen entering Restarting (a short restart between two polls can go unseen)."""
    duration_s: float
    """Seconds from creation until success was seen."""
    log_tail: tuple[str, ...]
    """The last lines of the workers' logs, prefixed with the replica (e.g. ``[worker-0]``)."""
    replica_statuses: dict[str, Any]
    """The final ``status.replicaStatuses`` (active / succeeded / failed per replica type)."""


def fetch_template(namespace: str | None = None, name: str = TEMPLATE_NAME, api: JobApi | None = None) -> dict:
    """The cluster's suspended template object (for ``spec_from_template``): the shape infra/'s overlay gave it."""
    api = api or KubernetesJobApi.from_environment()
    namespace = namespace or api.default_namespace
    try:
        return api.get_job(namespace, name)
    except ApiStatusError as exc:
        raise PyTorchJobError(_explain(exc, namespace)) from None
    except KubeError as exc:
        raise PyTorchJobError(str(exc)) from None


def run_pytorchjob(
    spec: PyTorchJobSpec,
    client: JobApi | None = None,
    poll_s: float = 10.0,
    log: Callable[[str], None] = print,
    tail_lines: int = 40,
) -> JobOutcome:
    """Create the job of ``spec``, follow it until it ends, return how it went (or raise; see the module doc).

    ``client``: the API to use; None connects as ``kube.connect`` says (in-cluster, else kubeconfig).  ``log``
    receives progress lines, the workers' log lines and warnings.  If following stops for any other reason
    (an exception, Ctrl-C), the job is deleted so that no training runs on unattended.
    """
    if poll_s < 0 or tail_lines < 1:
        raise ValueError("poll_s must be >= 0 and tail_lines >= 1")
    try:
        api = client or KubernetesJobApi.from_environment()
    except KubeError as exc:
        raise PyTorchJobError(str(exc)) from None
    namespace = spec.namespace or api.default_namespace
    body = build_pytorchjob(spec)
    body["metadata"]["namespace"] = namespace
    try:
        api.create_job(namespace, body)
    except ApiStatusError as exc:
        raise PyTorchJobError(_explain(exc, namespace)) from None
    except KubeError as exc:
        raise PyTorchJobError(str(exc)) from None
    log(f"PyTorchJob {namespace}/{spec.name} created: {spec.nodes} node(s) x {spec.procs_per_node} process(es)")
    follower = _Follower(api, namespace, spec.name, log, tail_lines)
    finished = False
    try:
        outcome = follower.follow(spec.timeout_s, poll_s)
        finished = True
        return outcome
    except (PyTorchJobFailed, PyTorchJobTimeout):
        finished = True  # failed: kept for inspection until its TTL; timed out: already deleted
        raise
    finally:
        if not finished:
            follower.delete(quiet=True)


class _Follower:
    """Polls one job: its conditions, its pods' logs (each line once) and Warning events about it."""

    def __init__(self, api: JobApi, namespace: str, name: str, log: Callable[[str], None], tail_lines: int):
        self.api, self.namespace, self.name, self.log = api, namespace, name, log
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.events: deque[str] = deque(maxlen=10)
        self.conditions: list[tuple[str, str, str]] = []
        self.restarts = 0
        self._seen_events: set[str] = set()
        self._pod_names: set[str] = set()
        # pod uid -> (timestamp of the last line printed, lines printed at that timestamp, monotonic read time)
        self._log_marks: dict[str, tuple[tuple[float, int], set[str], float]] = {}
        self._finished_pods: set[str] = set()

    def follow(self, timeout_s: float, poll_s: float) -> JobOutcome:
        start = time.monotonic()
        deadline = start + timeout_s
        errors = 0
        state = "Created (not yet seen)"
        while True:
            status: dict[str, Any] | None = None
            try:
                status = self.api.get_job(self.namespace, self.name).get("status") or {}
                state = self._track(status.get("conditions") or [])
                self._poll_logs()
                self._poll_events()
                errors = 0
            except ApiStatusError as exc:
                if exc.status == 404:
                    raise PyTorchJobError(f"PyTorchJob {self.namespace}/{self.name} disappeared: {exc}") from None
                if exc.status not in (429, 500, 502, 503, 504) or errors + 1 >= MAX_API_ERRORS:
                    raise PyTorchJobError(_explain(exc, self.namespace)) from None
                errors += 1
                self.log(f"warning: {exc} (retrying, {errors}/{MAX_API_ERRORS})")
            except KubeError as exc:
                if errors + 1 >= MAX_API_ERRORS:
                    raise PyTorchJobError(str(exc)) from None
                errors += 1
                self.log(f"warning: {exc} (retrying, {errors}/{MAX_API_ERRORS})")
            if status is not None:
                terminal = _true(status, "Failed") or _true(status, "Succeeded")
                if terminal is not None:
                    self._final_poll()
                    if terminal["type"] == "Failed":
                        reason, message = terminal.get("reason", ""), terminal.get("message", "")
                        raise PyTorchJobFailed(self.name, reason, message, tuple(self.tail), tuple(self.events))
                    self.log(f"PyTorchJob {self.name} succeeded")
                    return JobOutcome(
                        self.name,
                        self.namespace,
                        tuple(self.conditions),
                        self.restarts,
                        time.monotonic() - start,
                        tuple(self.tail),
                        dict(status.get("replicaStatuses") or {}),
                    )
            now = time.monotonic()
            if now >= deadline:
                self._final_poll()
                self.delete(quiet=False)
                raise PyTorchJobTimeout(self.name, timeout_s, state, tuple(self.tail), tuple(self.events))
            time.sleep(min(poll_s, deadline - now))

    def _track(self, conditions: list[dict[str, Any]]) -> str:
        """Log the current condition when it changes; count restarts. Returns the current state's name."""
        # The operator appends the condition it sets last and removes Running/Restarting when the other is set,
        # so the last True condition is the job's present state.
        current = [c for c in conditions if c.get("status") == "True"]
        if not current:
            return "Created (no condition yet)"
        last = current[-1]
        entry = (last.get("type", ""), last.get("reason", ""), last.get("message", ""))
        if not self.conditions or self.conditions[-1] != entry:
            self.conditions.append(entry)
            self.restarts += entry[0] == "Restarting"
            self.log(f"PyTorchJob {self.name}: {entry[0]} ({entry[1]}): {entry[2]}")
        return entry[0]

    def _poll_logs(self) -> None:
        """Print the lines each pod logged since the last poll (each line once, also across pod re-creation)."""
        for pod in self.api.list_pods(self.namespace, self.name):
            self._pod_names.add(pod.name)
            if pod.phase not in ("Running", "Succeeded", "Failed") or pod.uid in self._finished_pods:
                continue  # a Pending pod has no log yet
            mark = self._log_marks.get(pod.uid)
            now = time.monotonic()
            # The server filters by its own clock; the overlap (+ 2 s) is removed below by the timestamps.
            since = None if mark is None else int(now - mark[2]) + 2
            try:
                text = self.api.read_log(self.namespace, pod.name, since)
            except ApiStatusError as exc:
                if exc.status in (400, 404):  # container not started yet, or the pod just went away
                    continue
                raise
            last, at_last = (mark[0], mark[1]) if mark else ((float("-inf"), 0), set())
            prefix = f"[{pod.name.removeprefix(self.name + '-')}]"
            for raw in text.splitlines():
                parsed = log_timestamp(raw)
                if parsed is None:
                    continue
                stamp, line = parsed
                if stamp < last or (stamp == last and line in at_last):
                    continue
                if stamp > last:
                    last, at_last = stamp, set()
                at_last.add(line)
                self.tail.append(f"{prefix} {line}")
                self.log(f"{prefix} {line}")
            self._log_marks[pod.uid] = (last, at_last, now)
            if pod.phase in ("Succeeded", "Failed"):
                self._finished_pods.add(pod.uid)  # its log is complete: read once after it ended

    def _poll_events(self) -> None:
        """Print new Warning events about the job or its pods (scheduling, image pulls, restarts)."""
        for event in self.api.warning_events(self.namespace):
            if event.key in self._seen_events:
                continue
            if event.object_name != self.name and event.object_name not in self._pod_names:
                continue
            self._seen_events.add(event.key)
            line = f"{event.object_name}: {event.reason}: {event.message}"
            self.events.append(line)
            self.log(f"warning event: {line}")

    def _final_poll(self) -> None:
        """Last logs and events after the job ended (best effort: the verdict is already known)."""
        try:
            self._poll_logs()
            self._poll_events()
        except KubeError as exc:
            self.log(f"warning: could not read the final logs: {exc}")

    def delete(self, quiet: bool) -> None:
        """Delete the job (its pods go with it). ``quiet``: never raise (clean-up while another error is raised)."""
        try:
            self.api.delete_job(self.namespace, self.name)
            self.log(f"PyTorchJob {self.namespace}/{self.name} deleted")
        except ApiStatusError as exc:
            if exc.status != 404 and not quiet:
                raise PyTorchJobError(f"could not delete PyTorchJob {self.name}: {exc}") from None
        except KubeError as exc:
            if not quiet:
                raise PyTorchJobError(f"could not delete PyTorchJob {self.name}: {exc}") from None


def _true(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The condition ``kind`` when its status is True."""
    return next(
        (c for c in status.get("conditions") or [] if c.get("type") == kind and c.get("status") == "True"), None
    )


def _explain(exc: ApiStatusError, namespace: str) -> str:
    """An API error with what to do about it."""
    if exc.status in (401, 403):
        return (
            f"{exc}. The step's service account may not manage PyTorchJobs in namespace {namespace}: apply "
            "infra/k8s (Role and RoleBinding vilbert-pipeline) and bind the account that runs the step "
            "(infra/README.md, step 'Pipeline service account')"
        )
    if exc.status == 404:
        return f"{exc}. Is the Kubeflow Training Operator (kubeflow.org/v1 PyTorchJob) installed, and does {namespace} exist?"
    if exc.status == 409:
        return f"{exc}. A PyTorchJob of that name exists already: delete it or use another name"
    return str(exc)
