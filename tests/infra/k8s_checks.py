"""Offline checks of the Kubernetes manifests in infra/k8s, shared by the tests in this folder.

Each ``*_problems`` function returns a list of human-readable problems (empty: fine), so a test can assert on an
empty list and show every problem at once, and a negative test can assert that a broken object is caught.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("local", "gpu")

#: Kubernetes version the core objects are validated against (kubernetes-validate's strict schemas). The
#: Training Operator v1.9 and Kubeflow 1.10 support 1.29 to 1.32; pinned so that a newer kubernetes-validate
#: release does not silently change what is checked.
K8S_VERSION = "1.31.0"

#: Custom resources: kubernetes-validate has no schema for them; each is checked by its own function.
CRD_KINDS = {("kubeflow.org/v1", "PyTorchJob")}

#: Workload kinds and where their pod spec lives.
_POD_SPEC_PATHS = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}

#: Tests that render the overlays need kubectl (its built-in kustomize).
requires_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not on PATH: the overlays cannot be rendered"
)

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_PLACEHOLDER = "CHANGE_ME"
_SECRETISH_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|PRIVATE", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def prepare_tree(dest: Path) -> Path:
    """Copy infra/k8s to ``dest`` and create each secret env file from its ``*.env.example`` (as a user would).

    Returns the copied k8s folder. The repository itself is never written to.
    """
    tree = dest / "k8s"
    shutil.copytree(K8S, tree, ignore=_real_secret_files)
    for example in tree.rglob("*.env.example"):
        shutil.copyfile(example, example.with_suffix(""))
    return tree


def _real_secret_files(folder: str, names: list[str]) -> set[str]:
    """copytree filter: never copy (and so never render or print) a developer's real secret env files."""
    return {n for n in names if n.endswith(".env")} if Path(folder).name == "secrets" else set()


def kustomize(tree: Path, overlay: str) -> list[dict[str, Any]]:
    """Render ``overlays/<overlay>`` of a prepared tree with ``kubectl kustomize``; returns the objects."""
    proc = subprocess.run(
        ["kubectl", "kustomize", str(tree / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize overlays/{overlay} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def in_git_checkout() -> bool:
    """True when git is installed and the repository is a git work tree (not, e.g., inside a built image)."""
    if shutil.which("git") is None:
        return False
    return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode == 0


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    """The objects of one kind."""
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    """The single object of ``kind`` named ``name`` (generated names: the part before the hash suffix)."""
    found = [o for o in by_kind(objects, kind) if base_name(o) == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def base_name(obj: dict) -> str:
    """The object's name without kustomize's 10-character content-hash suffix, if it has one."""
    name = obj["metadata"]["name"]
    match = re.fullmatch(r"(.+)-[a-z0-9]{10}", name)
    return match.group(1) if match and obj["kind"] in ("ConfigMap", "Secret") else name


# ---------------------------------------------------------------------------------------------------------------
# Core objects: strict schema validation


def schema_problems(obj: dict, version: str = K8S_VERSION) -> list[str]:
    """Strict (no unknown field) validation of a core Kubernetes object with kubernetes-validate."""
    import kubernetes_validate

    kind = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{kind}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{kind}: {exc.message}"]
    return []


def pod_template_problems(template: dict, name: str, version: str = K8S_VERSION) -> list[str]:
    """Strict schema validation of a pod template (e.g. a PyTorchJob replica's) as a core PodTemplate."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
    return schema_problems(wrapped, version)


# ---------------------------------------------------------------------------------------------------------------
# Pods: resources, security, images, references


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(label, pod spec) of every pod template in ``obj``: workloads and PyTorchJob replicas."""
    kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
    if kind in _POD_SPEC_PATHS:
        spec: Any = obj
        for key in _POD_SPEC_PATHS[kind]:
            spec = spec[key]
        yield f"{kind}/{name}", spec
    elif kind == "PyTorchJob":
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            yield f"{kind}/{name}/{role}", replica["template"]["spec"]


def image_pinned(image: str) -> bool:
    """True for ``name@sha256:...`` or ``name:tag`` with a tag other than ``latest``."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def container_problems(label: str, pod: dict) -> list[str]:
    """Resources, non-root security context and pinned image of every (init) container of a pod spec."""
    from kubernetes.utils import parse_quantity

    problems = []
    pod_sec = pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append(f"{label}: shares a host namespace")
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        where = f"{label}/{container.get('name')}"
        sec = container.get("securityContext", {})
        if not image_pinned(container.get("image", "")):
            problems.append(f"{where}: image {container.get('image')!r} is not pinned (tag or digest, not latest)")
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        for resource in ("cpu", "memory"):
            if resource not in limits:
                problems.append(f"{where}: no {resource} limit")
            if resource not in requests:
                problems.append(f"{where}: no {resource} request")
        for resource, request in requests.items():
            if resource in limits and parse_quantity(request) > parse_quantity(limits[resource]):
                problems.append(f"{where}: {resource} request {request} above its limit {limits[resource]}")
        if "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != limits.get("nvidia.com/gpu"):
            problems.append(f"{where}: GPU request and limit differ (extended resources need them equal)")
        run_as_non_root = sec.get("runAsNonRoot", pod_sec.get("runAsNonRoot"))
        run_as_user = sec.get("runAsUser", pod_sec.get("runAsUser"))
        if run_as_non_root is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if run_as_user in (None, 0):
            problems.append(f"{where}: runAsUser must be a non-zero uid (runAsNonRoot alone fails on root images)")
        if sec.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sec.get("privileged"):
            problems.append(f"{where}: privileged")
        if "ALL" not in sec.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities are not all dropped")
        if sec.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        if sec.get("seccompProfile", pod_sec.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
    return problems


def probe_problems(label: str, pod: dict) -> list[str]:
    """Long-running containers need startup, readiness and liveness probes whose named ports exist."""
    problems = []
    for container in pod.get("containers", []):
        where = f"{label}/{container['name']}"
        ports = {p.get("name") for p in container.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                problems.append(f"{where}: no {kind}")
                continue
            port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
            if isinstance(port, str) and port not in ports:
                problems.append(f"{where}: {kind} uses port {port!r}, not a named container port")
    return problems


def reference_problems(objects: list[dict], label: str, pod: dict) -> list[str]:
    """Every ConfigMap, Secret, key and PVC that a pod spec names exists in the rendering."""
    data: dict[tuple[str, str], set[str]] = {}
    for obj in by_kind(objects, "ConfigMap") + by_kind(objects, "Secret"):
        keys = set(obj.get("data", {})) | set(obj.get("stringData", {}))
        data[(obj["kind"], obj["metadata"]["name"])] = keys
    claims = {o["metadata"]["name"] for o in by_kind(objects, "PersistentVolumeClaim")}
    problems = []

    def need(kind: str, name: str, key: str | None, where: str) -> None:
        if (kind, name) not in data:
            problems.append(f"{where}: {kind} {name} does not exist")
        elif key is not None and key not in data[(kind, name)]:
            problems.append(f"{where}: {kind} {name} has no key {key}")

    for container in pod.get("initContainers", []) + pod.get("containers", []):
        where = f"{label}/{container['name']}"
        defined = set()
        for env in container.get("env", []):
            defined.add(env["name"])
            source = env.get("valueFrom", {})
            if "configMapKeyRef" in source:
                need("ConfigMap", source["configMapKeyRef"]["name"], source["configMapKeyRef"]["key"], where)
            if "secretKeyRef" in source:
                need("Secret", source["secretKeyRef"]["name"], source["secretKeyRef"]["key"], where)
        for env_from in container.get("envFrom", []):
            if "configMapRef" in env_from:
                need("ConfigMap", env_from["configMapRef"]["name"], None, where)
            if "secretRef" in env_from:
                need("Secret", env_from["secretRef"]["name"], None, where)
        # $(VAR) in command/args is expanded by Kubernetes; an undefined one stays literal, silently.
        for arg in container.get("command", []) + container.get("args", []):
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                if var not in defined:
                    problems.append(f"{where}: $({var}) used in command/args but not defined in env")
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"] for v in pod.get("volumes", [])}
        missing = mounts - volumes - {"data"}  # "data": StatefulSet volumeClaimTemplates
        if missing:
            problems.append(f"{where}: mounts undefined volumes {sorted(missing)}")
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            need("ConfigMap", volume["configMap"]["name"], None, f"{label}/volume {volume['name']}")
        if "secret" in volume:
            need("Secret", volume["secret"]["secretName"], None, f"{label}/volume {volume['name']}")
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and claim not in claims:
            problems.append(f"{label}/volume {volume['name']}: PVC {claim} does not exist")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Secrets


def secret_value_problems(secret: dict, allowed_plain: set[str] | None = None) -> list[str]:
    """Values of a rendered Secret that look real: a secret-ish key whose value is not a CHANGE_ME placeholder,
    or any value that looks like a random credential. ``allowed_plain`` are non-secret values (user names)."""
    import base64

    allowed_plain = allowed_plain or set()
    problems = []
    name = secret["metadata"]["name"]
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    for key, value in values.items():
        if value.startswith(_PLACEHOLDER) or value in allowed_plain:
            continue
        if _SECRETISH_KEY.search(key):
            problems.append(f"Secret {name}: {key} holds a value that is not a {_PLACEHOLDER} placeholder")
        elif len(value) >= 12 and re.search(r"\d", value) and re.search(r"[A-Za-z]", value):
            problems.append(f"Secret {name}: {key} holds a real-looking value")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# PyTorchJob: the Training Operator's SDK models and its admission rules


class _Response:
    """What ``ApiClient.deserialize`` reads: an object with the JSON body in ``data``."""

    def __init__(self, body: dict) -> None:
        self.data = json.dumps(body)


def _drop_empty(value: Any) -> Any:
    """Drop None values (the SDK serialises unset fields as absent), recursively."""
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ (a: what was written, b: what the typed model kept)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            where = f"{path}.{key}" if path else key
            if key not in b:
                out.append(f"{where}: unknown field (dropped by the typed model)")
            elif key not in a:
                out.append(f"{where}: added by the typed model")
            else:
                out += _diff(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    if a != b or type(a) is not type(b):
        return [f"{path}: {a!r} ({type(a).__name__}) is read as {b!r} ({type(b).__name__})"]
    return []


def pytorchjob_problems(job: dict, version: str = K8S_VERSION) -> list[str]:
    """Check a PyTorchJob dict against the kubeflow-training SDK models and the operator's admission rules.

    1. Deserialise into ``KubeflowOrgV1PyTorchJob`` (required fields, primitive types; the pod templates go
       through the Kubernetes client's models) and serialise it back: any difference is an unknown field (a
       typo the API server would prune) or a value of the wrong type.
    2. The Training Operator's validating webhook: DNS-1035 name, replica types Master/Worker only, Master
       exactly 1 replica, Worker >= 1 and present when elasticPolicy is set, a container named "pytorch" with
       an image in each replica, nprocPerNode not combined with the deprecated elasticPolicy.nProcPerNode.
    3. Consistency this project relies on: min <= max replicas, a GPU limit equal to nprocPerNode, the
       operator's port name on the pytorch container.
    4. Each replica's pod template against the strict core PodTemplate schema.
    """
    from kubeflow.training import ApiClient

    problems: list[str] = []
    client = ApiClient()
    try:
        model = client.deserialize(_Response(job), "KubeflowOrgV1PyTorchJob")
    except (ValueError, TypeError) as exc:
        return [f"SDK model rejects it: {exc}"]
    problems += _diff(_drop_empty(job), _drop_empty(client.sanitize_for_serialization(model)))
    if problems:
        return problems

    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        problems.append("apiVersion/kind must be kubeflow.org/v1 PyTorchJob")
    name = job["metadata"].get("name", "")
    if not _DNS1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    if set(replicas) - {"Master", "Worker"}:
        problems.append(f"replica types {sorted(set(replicas) - {'Master', 'Worker'})} are not Master/Worker")
    if "Master" in replicas and replicas["Master"].get("replicas") != 1:
        problems.append("Master must have exactly 1 replica")
    if "Worker" in replicas and replicas["Worker"].get("replicas", 1) < 1:
        problems.append("Worker must have at least 1 replica")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            problems.append("an elastic job needs a Worker replica spec")
        if "nProcPerNode" in elastic and "nprocPerNode" in spec:
            problems.append("elasticPolicy.nProcPerNode (deprecated) must not be combined with nprocPerNode")
        low, high = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if low is not None and high is not None and not 1 <= low <= high:
            problems.append(f"elasticPolicy needs 1 <= minReplicas <= maxReplicas, got {low}..{high}")
    nproc = spec.get("nprocPerNode")
    for role, replica in replicas.items():
        if replica.get("restartPolicy") not in (None, "Always", "OnFailure", "Never", "ExitCode"):
            problems.append(f"{role}: restartPolicy {replica.get('restartPolicy')!r} is not supported")
        containers = replica["template"].get("spec", {}).get("containers", [])
        pytorch = [c for c in containers if c.get("name") == "pytorch"]
        if not pytorch:
            problems.append(f"{role}: no container named 'pytorch' (the operator configures that one)")
        for container in containers:
            if not container.get("image"):
                problems.append(f"{role}/{container.get('name')}: no image")
        for container in pytorch:
            if "pytorchjob-port" not in {p.get("name") for p in container.get("ports", [])}:
                problems.append(f"{role}: the pytorch container has no port named 'pytorchjob-port'")
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None and nproc not in (None, "gpu", "auto") and str(gpus) != nproc:
                problems.append(f"{role}: nvidia.com/gpu limit {gpus} differs from nprocPerNode {nproc}")
        problems += pod_template_problems(replica["template"], f"{name}-{role.lower()}", version)
    return problems
