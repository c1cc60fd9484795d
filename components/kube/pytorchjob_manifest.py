"""Spec -> kubeflow.org/v1 PyTorchJob manifest, and back from a template.

``build_pytorchjob(spec)`` is the single source of the job's shape: infra/k8s/base/pytorchjob/pretrain-template.yaml
is its output for the template spec (tests/infra keeps them equal), and ``spec_from_template`` reads a template
back (from the cluster, or an overlay's rendering) and refuses one the builder would not reproduce exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from .pytorchjob_spec import (
    BASE_LABELS,
    CONTAINER,
    DEADLINE_GRACE_S,
    IMAGE_UID,
    LAUNCHER,
    PORT,
    PORT_NAME,
    TEMPLATE_LABEL,
    PvcMount,
    PyTorchJobSpec,
    PyTorchJobSpecError,
    Toleration,
)

# ---------------------------------------------------------------------------------------------------------------
# Spec -> manifest


def build_pytorchjob(spec: PyTorchJobSpec, *, suspend: bool = False) -> dict[str, Any]:
    """The kubeflow.org/v1 PyTorchJob manifest of ``spec`` (a plain dict, ready for the API or YAML).

    Elastic (c10d rendezvous, min..max nodes, max restarts), Worker replicas only (the operator's elastic form:
    the rendezvous host is worker-0, and no pod gets the static RANK/WORLD_SIZE a Master would add), one
    ``pytorch`` container running ``torchrun --no-python <command>``. ``suspend``: create it without pods.
    """
    gpus = {"nvidia.com/gpu": str(spec.gpus_per_node)} if spec.gpus_per_node else {}
    resources = {
        "requests": {"cpu": spec.cpu_request, "memory": spec.memory_request, **gpus},
        "limits": {"cpu": spec.cpu_limit, "memory": spec.memory_limit, **gpus},
    }
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in spec.env.items()]
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for secret, keys in spec.env_from_secrets.items()
        for key in keys
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [*LAUNCHER, *spec.command],
        "ports": [{"name": PORT_NAME, "containerPort": PORT}],
    }
    if env:
        container["env"] = env
    if spec.env_from_config_maps:
        container["envFrom"] = [{"configMapRef": {"name": name}} for name in spec.env_from_config_maps]
    container["resources"] = resources
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    container["volumeMounts"] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        *(
            {"name": v.name, "mountPath": v.mount_path, **({"readOnly": True} if v.read_only else {})}
            for v in spec.volumes
        ),
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": spec.tmp_size}},
    ]
    for v in spec.volumes:
        claim: dict[str, Any] = {"claimName": v.claim, **({"readOnly": True} if v.read_only else {})}
        volumes.append({"name": v.name, "persistentVolumeClaim": claim})
    pod: dict[str, Any] = {
        "serviceAccountName": spec.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": IMAGE_UID,
            "runAsGroup": IMAGE_UID,
            "fsGroup": IMAGE_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [_toleration(t) for t in spec.tolerations]
    pod["containers"] = [container]
    pod["volumes"] = volumes
    metadata: dict[str, Any] = {"name": spec.name}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    metadata["labels"] = {**BASE_LABELS, **spec.labels}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(spec.procs_per_node),  # a string in the API ("auto", "gpu" are allowed too)
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "minReplicas": spec.min_nodes,
                "maxReplicas": spec.nodes,
                "maxRestarts": spec.max_restarts,
            },
            "runPolicy": {
                "suspend": suspend,
                "cleanPodPolicy": spec.clean_pod_policy,
                "backoffLimit": spec.backoff_limit,
                "ttlSecondsAfterFinished": spec.ttl_s,
                "activeDeadlineSeconds": math.ceil(spec.timeout_s) + DEADLINE_GRACE_S,
            },
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": spec.nodes,
                    "restartPolicy": spec.restart_policy,
                    "template": {
                        "metadata": {"labels": dict(BASE_LABELS), "annotations": {"sidecar.istio.io/inject": "false"}},
                        "spec": pod,
                    },
                }
            },
        },
    }


def _toleration(t: Toleration) -> dict[str, str]:
    out = {"key": t.key, "operator": t.operator}
    if t.value:
        out["value"] = t.value
    if t.effect:
        out["effect"] = t.effect
    return out


def build_template(spec: PyTorchJobSpec) -> dict[str, Any]:
    """The suspended template object of infra/ (named TEMPLATE_NAME, labelled TEMPLATE_LABEL, no pods)."""
    job = build_pytorchjob(spec, suspend=True)
    job["metadata"]["labels"][TEMPLATE_LABEL] = "true"
    return job


# ---------------------------------------------------------------------------------------------------------------
# Template -> spec


class TemplateMismatch(PyTorchJobSpecError):
    """A PyTorchJob template holds something this builder would not reproduce (it would be silently lost)."""


def spec_from_template(template: Mapping[str, Any], **overrides: Any) -> PyTorchJobSpec:
    """A spec that rebuilds ``template`` (the cluster's shape), with ``overrides`` applied (image, command, nodes...).

    ``template``: the suspended template object (``kubectl get pytorchjob vilbert-pretrain-template -o json``, or
    the PyTorchJob document of ``kubectl kustomize infra/k8s/overlays/<overlay>``). Its name is not kept (a new
    one is generated unless ``name`` is overridden). Raises TemplateMismatch, listing the paths, when the template
    holds anything ``build_pytorchjob`` would not write back identically (an extra container, a hostPath volume,
    a changed security context...): the cluster's intent is never silently dropped.
    """
    try:
        fields_ = _read_template(template)
    except (KeyError, TypeError, ValueError, IndexError, StopIteration) as exc:
        raise TemplateMismatch(f"not a PyTorchJob template this builder understands: {exc!r}") from exc
    rebuilt = build_template(PyTorchJobSpec(**fields_))
    wanted = _normalised(template)
    differences = _differences(wanted, _normalised(rebuilt))
    if differences:
        raise TemplateMismatch("the template differs from what build_pytorchjob writes:\n  " + "\n  ".join(differences))
    # Values the template holds only because they follow from others are left to follow the overrides: with
    # min = max nodes (no shrinking), min_nodes follows ``nodes``; with one process per GPU, procs follows GPUs.
    if fields_["min_nodes"] == fields_["nodes"]:
        fields_["min_nodes"] = None
    if fields_["procs_per_node"] == (fields_["gpus_per_node"] or 1):
        fields_["procs_per_node"] = None
    try:
        return PyTorchJobSpec(**{**fields_, "name": "", **overrides})
    except TypeError as exc:  # an unknown override name
        raise PyTorchJobSpecError(str(exc)) from None


def _read_template(job: Mapping[str, Any]) -> dict[str, Any]:
    """The spec fields a template encodes (inverse of build_pytorchjob)."""
    spec, metadata = job["spec"], job["metadata"]
    elastic, run = spec["elasticPolicy"], spec["runPolicy"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    pod = worker["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == CONTAINER)
    command = list(container["command"])
    if command[: len(LAUNCHER)] != list(LAUNCHER):
        raise ValueError(f"the container command does not start with {' '.join(LAUNCHER)}")
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    env: dict[str, str] = {}
    secrets: dict[str, list[str]] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secrets.setdefault(ref["name"], []).append(ref["key"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in container["volumeMounts"] if m["name"] not in ("dshm", "tmp")]
    labels = {k: v for k, v in metadata.get("labels", {}).items() if k not in BASE_LABELS and k != TEMPLATE_LABEL}
    return {
        "image": container["image"],
        "command": tuple(command[len(LAUNCHER) :]),
        "name": metadata["name"],
        "namespace": metadata.get("namespace"),
        "nodes": elastic["maxReplicas"],
        "min_nodes": elastic["minReplicas"],
        "gpus_per_node": int(limits.get("nvidia.com/gpu", 0)),
        "procs_per_node": int(spec["nprocPerNode"]),
        "cpu_request": requests["cpu"],
        "cpu_limit": limits["cpu"],
        "memory_request": requests["memory"],
        "memory_limit": limits["memory"],
        "max_restarts": elastic["maxRestarts"],
        "restart_policy": worker["restartPolicy"],
        "backoff_limit": run["backoffLimit"],
        "node_selector": pod.get("nodeSelector", {}),
        "tolerations": tuple(Toleration(**t) for t in pod.get("tolerations", [])),
        "env": env,
        "env_from_secrets": {k: tuple(v) for k, v in secrets.items()},
        "env_from_config_maps": tuple(e["configMapRef"]["name"] for e in container.get("envFrom", [])),
        "shm_size": volumes["dshm"]["emptyDir"]["sizeLimit"],
        "tmp_size": volumes["tmp"]["emptyDir"]["sizeLimit"],
        "volumes": tuple(
            PvcMount(
                m["name"],
                volumes[m["name"]]["persistentVolumeClaim"]["claimName"],
                m["mountPath"],
                m.get("readOnly", False),
            )
            for m in mounts
        ),
        "service_account": pod["serviceAccountName"],
        "ttl_s": run["ttlSecondsAfterFinished"],
        "clean_pod_policy": run["cleanPodPolicy"],
        "timeout_s": float(run["activeDeadlineSeconds"] - DEADLINE_GRACE_S),
        "labels": labels,
    }


#: Written by the API server (or kubectl), not part of the job's intent.
_SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink")
#: Written by `kubectl apply` (client-side); any other annotation is the cluster's intent and must be kept.
_APPLY_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


def _normalised(job: Mapping[str, Any]) -> dict[str, Any]:
    """The job without what is not its shape: server-written metadata, status, the namespace (kustomize and the
    API set it), the template marker and ``suspend`` (so that a template and a job built from it compare equal)."""
    out = copy.deepcopy(dict(job))
    out.pop("status", None)
    metadata = out.get("metadata", {})
    for key in (*_SERVER_FIELDS, "namespace"):
        metadata.pop(key, None)
    metadata.get("labels", {}).pop(TEMPLATE_LABEL, None)
    metadata.get("annotations", {}).pop(_APPLY_ANNOTATION, None)
    if metadata.get("annotations") == {}:
        del metadata["annotations"]
    out.get("spec", {}).get("runPolicy", {}).pop("suspend", None)
    return out


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where the template (a) and the rebuilt job (b) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in b:
                out.append(f"{where}: in the template, not written by the builder")
            elif key not in a:
                out.append(f"{where}: written by the builder, not in the template")
            else:
                out += _differences(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [d for i, (x, y) in enumerate(zip(a, b, strict=False)) for d in _differences(x, y, f"{path}[{i}]")]
        out += [
            f"{path}[{i}]: in the template, not written by the builder: {x!r}" for i, x in enumerate(a) if i >= len(b)
        ]
        out += [
            f"{path}[{i}]: written by the builder, not in the template: {y!r}" for i, y in enumerate(b) if i >= len(a)
        ]
        return out
    return [] if a == b and type(a) is type(b) else [f"{path}: template {a!r}, builder {b!r}"]
