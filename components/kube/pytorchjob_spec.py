"""The typed, validated description of a training PyTorchJob (``pytorchjob_manifest`` turns it into a manifest).

The Kubeflow Training Operator (kubeflow.org/v1) conventions used here: the container must be named
``pytorch`` and expose the port ``pytorchjob-port``; an elastic job has only Worker replicas, rendezvous
through c10d at ``<name>-worker-0``, and the operator passes the topology to ``torchrun`` as ``PET_*`` variables.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The container the operator configures (kubeflow.org/v1 PyTorchJobDefaultContainerName).
CONTAINER = "pytorch"
#: The operator's port name and default port: the c10d rendezvous endpoint is <name>-worker-0:<port>.
PORT_NAME, PORT = "pytorchjob-port", 23456
#: Name of the suspended template object that infra/ applies with the stack.
TEMPLATE_NAME = "vilbert-pretrain-template"
#: Label that marks the template; never carried over to a real job.
TEMPLATE_LABEL = "vilbert.io/template"
#: Labels on the job and its pods (the operator adds its training.kubeflow.org/* labels to the pods).
BASE_LABELS = {"app.kubernetes.io/name": "vilbert-pretrain", "app.kubernetes.io/component": "training"}
#: uid/gid of the user the component image creates (infra/docker/Dockerfile*).
IMAGE_UID = 10001
#: Longest job name: pod and Service names append "-worker-<index>" and must stay DNS-1035 labels (63).
MAX_NAME_LENGTH = 40
#: The server-side deadline (runPolicy.activeDeadlineSeconds) exceeds the client's timeout by this much, so the
#: client normally times out first and deletes the job; the deadline ends a job whose follower died.
DEADLINE_GRACE_S = 600
#: torchrun runs each worker process; it reads the PET_* variables the operator sets (nodes, rendezvous,
#: processes per node, max restarts), so the command line does not repeat them.
LAUNCHER = ("torchrun", "--no-python")

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
#: Set by the operator or torchrun in every worker: a value from the spec would be overwritten or conflict.
_RESERVED_ENV = re.compile(r"^(PET_.*|RANK|LOCAL_RANK|WORLD_SIZE|MASTER_ADDR|MASTER_PORT|PYTHONUNBUFFERED)$")
_RESTART_POLICIES = ("ExitCode", "OnFailure", "Never", "Always")
_CLEAN_POD_POLICIES = ("Running", "All", "None")


class PyTorchJobSpecError(ValueError):
    """A PyTorchJob setting is missing, malformed or inconsistent; the message names it."""


@dataclass(frozen=True)
class PvcMount:
    """A PersistentVolumeClaim mounted into every training pod."""

    name: str
    """Volume name inside the pod (DNS-1123 label)."""
    claim: str
    """Name of the PersistentVolumeClaim (in the job's namespace)."""
    mount_path: str
    """Absolute path of the mount in the container."""
    read_only: bool = False
    """Mount read-only (inputs), or read-write (the output volume)."""


@dataclass(frozen=True)
class Toleration:
    """A node taint that the training pods tolerate (e.g. a GPU node pool's)."""

    key: str
    """Taint key, e.g. ``nvidia.com/gpu``."""
    operator: str = "Exists"
    """``Exists`` (any value) or ``Equal`` (``value`` must match)."""
    value: str = ""
    """Taint value, for ``Equal`` only."""
    effect: str = "NoSchedule"
    """Taint effect: NoSchedule, PreferNoSchedule, NoExecute, or empty for all."""


#: The stack's volumes (infra/k8s/base/storage.yaml), at the VILBERT_*_DIR paths of ConfigMap vilbert-config.
STACK_VOLUMES = (
    PvcMount("datasets", "vilbert-datasets", "/data/datasets", read_only=True),
    PvcMount("features", "vilbert-features", "/data/features", read_only=True),
    PvcMount("checkpoints", "vilbert-checkpoints", "/data/checkpoints"),
)
#: The stack's credentials for S3/MinIO and MLflow (infra/k8s/components/secrets), as the standard variables.
STACK_SECRETS = {
    "vilbert-s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    "vilbert-mlflow-client": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
}


@dataclass(frozen=True)
class PyTorchJobSpec:
    """One distributed training run as a Kubeflow PyTorchJob; the defaults fit the stack that infra/ deploys."""

    image: str
    """Container image of the workers (the component image; pin it by tag or digest)."""
    command: tuple[str, ...]
    """Program and arguments every worker process runs under torchrun, e.g. ``("vilbert", "pretrain", ...)``."""
    name: str = ""
    """Job name (DNS-1035 label, at most 40 characters); empty: ``name_prefix`` plus 8 random hex digits."""
    name_prefix: str = "vilbert-pretrain"
    """Prefix of generated names."""
    namespace: str | None = None
    """Namespace of the job; None: the caller's (in-cluster: the step's own; else the kubeconfig context's)."""
    nodes: int = 1
    """Nodes (worker pods) to start; the elastic maximum."""
    min_nodes: int | None = None
    """Fewest nodes training may continue with (elastic minimum); None: ``nodes`` (no shrinking)."""
    gpus_per_node: int = 0
    """GPUs requested per pod (``nvidia.com/gpu``); 0 trains on CPU."""
    procs_per_node: int | None = None
    """Worker processes per pod (torchrun's nproc-per-node); None: one per GPU, or 1 without GPUs."""
    cpu_request: str = "4"
    """CPU request per pod (Kubernetes quantity)."""
    cpu_limit: str = "8"
    """CPU limit per pod."""
    memory_request: str = "32Gi"
    """Memory request per pod."""
    memory_limit: str = "64Gi"
    """Memory limit per pod."""
    max_restarts: int = 3
    """Restarts of the whole worker group by torchrun before the job fails (elasticPolicy.maxRestarts)."""
    restart_policy: str = "ExitCode"
    """Pod restarts by the operator: ExitCode retries pods killed by signals (exit codes 128+: preemption, OOM)
    and fails on 1-127, so a crash is retried only ``max_restarts`` times (by torchrun), not again per pod."""
    backoff_limit: int = 3
    """Pod restarts by the operator before the job fails (runPolicy.backoffLimit)."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    """Node labels the pods require, e.g. the GPU node pool's."""
    tolerations: tuple[Toleration, ...] = ()
    """Node taints the pods tolerate."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Plain environment variables of the workers."""
    env_from_secrets: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(STACK_SECRETS))
    """Secret name -> keys, each exposed as an environment variable of the same name (S3, MLflow credentials)."""
    env_from_config_maps: tuple[str, ...] = ("vilbert-config",)
    """ConfigMaps whose every key becomes an environment variable (non-secret settings)."""
    shm_size: str = "16Gi"
    """Size of /dev/shm (a memory emptyDir: NCCL and DataLoader workers; the container default is 64 MiB)."""
    tmp_size: str = "20Gi"
    """Size of the writable /tmp (the root filesystem is read-only)."""
    volumes: tuple[PvcMount, ...] = STACK_VOLUMES
    """PersistentVolumeClaims to mount: data, features, and the output volume."""
    service_account: str = "vilbert-trainer"
    """Service account of the pods (the stack's has no API access; no token is mounted)."""
    ttl_s: int = 86400
    """Seconds the finished job (and its finished pods, with their logs) stays before deletion."""
    clean_pod_policy: str = "Running"
    """Pods deleted when the job ends: Running (keep finished pods and their logs), All, or None."""
    timeout_s: float = 3 * 86400
    """Seconds from creation until the follower gives up and deletes the job."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Extra labels on the job (e.g. the pipeline run's id)."""

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("command", tuple(self.command))
        fix("tolerations", tuple(self.tolerations))
        fix("volumes", tuple(self.volumes))
        fix("env_from_config_maps", tuple(self.env_from_config_maps))
        fix("node_selector", dict(self.node_selector))
        fix("env", dict(self.env))
        fix("labels", dict(self.labels))
        fix("env_from_secrets", {k: tuple(v) for k, v in self.env_from_secrets.items()})
        if not self.name:
            if not _DNS1035.match(self.name_prefix) or len(self.name_prefix) > MAX_NAME_LENGTH - 9:
                raise PyTorchJobSpecError(f"name_prefix {self.name_prefix!r}: a DNS-1035 label of at most 31 chars")
            fix("name", f"{self.name_prefix}-{uuid.uuid4().hex[:8]}")
        if self.min_nodes is None:
            fix("min_nodes", self.nodes)
        if self.procs_per_node is None:
            fix("procs_per_node", self.gpus_per_node or 1)
        _validate(self)


def _validate(spec: PyTorchJobSpec) -> None:
    """Every check of a spec; the first problem raises PyTorchJobSpecError."""
    from kubernetes.utils import parse_quantity

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise PyTorchJobSpecError(message)

    need(bool(spec.image) and not re.search(r"\s", spec.image), f"image {spec.image!r} is empty or has whitespace")
    need(len(spec.command) > 0 and all(isinstance(a, str) and a for a in spec.command), "command: non-empty strings")
    need(
        bool(_DNS1035.match(spec.name)) and len(spec.name) <= MAX_NAME_LENGTH,
        f"name {spec.name!r}: a DNS-1035 label (lower-case letters, digits, '-', a letter first) of at most "
        f"{MAX_NAME_LENGTH} characters",
    )
    need(spec.namespace is None or bool(_DNS1123_LABEL.match(spec.namespace)), f"namespace {spec.namespace!r}")
    need(spec.nodes >= 1, f"nodes must be >= 1, got {spec.nodes}")
    assert spec.min_nodes is not None and spec.procs_per_node is not None  # set in __post_init__
    need(1 <= spec.min_nodes <= spec.nodes, f"min_nodes must be in 1..nodes={spec.nodes}, got {spec.min_nodes}")
    need(spec.gpus_per_node >= 0, f"gpus_per_node must be >= 0, got {spec.gpus_per_node}")
    need(spec.procs_per_node >= 1, f"procs_per_node must be >= 1, got {spec.procs_per_node}")
    need(
        spec.gpus_per_node == 0 or spec.procs_per_node == spec.gpus_per_node,
        f"procs_per_node ({spec.procs_per_node}) must equal gpus_per_node ({spec.gpus_per_node}): one process per GPU",
    )
    quantities = {}
    for key in ("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size", "tmp_size"):
        try:
            quantities[key] = parse_quantity(getattr(spec, key))
        except ValueError:
            raise PyTorchJobSpecError(f"{key} {getattr(spec, key)!r} is not a Kubernetes quantity") from None
        need(quantities[key] > 0, f"{key} must be positive, got {getattr(spec, key)!r}")
    for what in ("cpu", "memory"):
        need(quantities[f"{what}_request"] <= quantities[f"{what}_limit"], f"{what}_request is above {what}_limit")
    need(spec.max_restarts >= 0 and spec.backoff_limit >= 0 and spec.ttl_s >= 0, "restarts and ttl_s must be >= 0")
    need(spec.restart_policy in _RESTART_POLICIES, f"restart_policy must be one of {_RESTART_POLICIES}")
    need(spec.clean_pod_policy in _CLEAN_POD_POLICIES, f"clean_pod_policy must be one of {_CLEAN_POD_POLICIES}")
    need(math.isfinite(spec.timeout_s) and spec.timeout_s > 0, f"timeout_s must be > 0, got {spec.timeout_s}")
    for key, value in {**spec.node_selector, **spec.labels}.items():
        need(bool(_LABEL_KEY.match(key)) and bool(_LABEL_VALUE.match(value)), f"label/selector {key}={value!r}")
    for tol in spec.tolerations:
        need(tol.operator in ("Exists", "Equal"), f"toleration {tol.key}: operator must be Exists or Equal")
        need(tol.operator == "Equal" or not tol.value, f"toleration {tol.key}: a value needs operator Equal")
        need(tol.effect in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"), f"toleration {tol.key}: effect")
    env_names = list(spec.env) + [key for keys in spec.env_from_secrets.values() for key in keys]
    for env_name in env_names:
        need(bool(_ENV_NAME.match(env_name)), f"environment variable name {env_name!r} is not valid")
        need(not _RESERVED_ENV.match(env_name), f"environment variable {env_name}: set by the operator or torchrun")
    need(len(set(env_names)) == len(env_names), f"environment variables defined twice: {sorted(env_names)}")
    for ref in list(spec.env_from_secrets) + list(spec.env_from_config_maps) + [spec.service_account]:
        need(bool(_DNS1123_SUBDOMAIN.match(ref)), f"{ref!r} is not a valid object name")
    names = [v.name for v in spec.volumes] + ["dshm", "tmp"]
    paths = [v.mount_path for v in spec.volumes] + ["/dev/shm", "/tmp"]
    need(len(set(names)) == len(names), f"volume names must be unique and not dshm/tmp: {names}")
    need(len(set(paths)) == len(paths), f"mount paths must be unique and not /dev/shm or /tmp: {paths}")
    for volume in spec.volumes:
        need(bool(_DNS1123_LABEL.match(volume.name)), f"volume name {volume.name!r} is not a DNS-1123 label")
        need(bool(_DNS1123_SUBDOMAIN.match(volume.claim)), f"claim {volume.claim!r} is not a valid name")
        need(volume.mount_path.startswith("/"), f"mount path {volume.mount_path!r} is not absolute")
