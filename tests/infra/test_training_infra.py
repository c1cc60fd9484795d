"""infra/ for training: the PyTorchJob template (generated from the launcher's builder, shaped by each overlay, read
back by the launcher), and the Role / RoleBinding that let the pipeline's pretrain step run and follow it."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import yaml

from components.kube.pytorchjob import (
    TEMPLATE_NAME,
    PyTorchJobSpec,
    PyTorchJobTimeout,
    build_pytorchjob,
    build_template,
    run_pytorchjob,
    spec_from_template,
)
from tests.infra import k8s_checks as kc
from tests.infra.pretrain_template import TEMPLATE_FILE, TEMPLATE_SPEC, render
from tests.infra.replay_cluster import Frame, OperatorStatus, ReplayCluster, rbac_needs

pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (strict schema checks)")
pytest.importorskip("kubeflow.training", reason="kubeflow-training is not installed (PyTorchJob models)")

requires_kubectl = kc.requires_kubectl
IMAGE = "registry.example.com/vilbert-mlops@sha256:" + "1" * 64


def _template(objects: list[dict]) -> dict:
    return kc.one(objects, "PyTorchJob", TEMPLATE_NAME)


# ---------------------------------------------------------------------------------------------------------------
# The template: one source (the builder), shaped by the overlays, read back by the launcher


def test_template_file_is_the_builders_output():
    regenerate = "infra's template and the builder disagree: run .venv/bin/python -m tests.infra.pretrain_template"
    assert yaml.safe_load(TEMPLATE_FILE.read_text()) == build_template(TEMPLATE_SPEC), regenerate
    assert TEMPLATE_FILE.read_text() == render(), regenerate + " (the file was edited by hand)"


def test_repository_template_file_validates():
    """The base file itself validates, without kubectl."""
    job = yaml.safe_load(TEMPLATE_FILE.read_text())
    job["metadata"]["namespace"] = "vilbert"
    assert kc.pytorchjob_problems(job) == []


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_pytorchjob_template_validates(rendered, overlay):
    job = _template(rendered[overlay])
    assert kc.pytorchjob_problems(job) == []
    spec = job["spec"]
    assert spec["runPolicy"]["suspend"] is True, "the template must never start pods"
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}, "elastic jobs: Worker replicas only"
    pod = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "pytorch")
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["envFrom"] == [{"configMapRef": {"name": "vilbert-config"}}]
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"vilbert-s3", "vilbert-mlflow-client"}
    config = kc.one(rendered[overlay], "ConfigMap", "vilbert-config")["data"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {config[k] for k in ("VILBERT_DATASETS_DIR", "VILBERT_FEATURES_DIR", "VILBERT_CHECKPOINTS_DIR")} <= mounts
    gpus = container["resources"]["limits"].get("nvidia.com/gpu", "0")
    assert gpus == config["VILBERT_GPUS_PER_NODE"]
    if overlay == "gpu":
        assert gpus == spec["nprocPerNode"] and pod["nodeSelector"] and pod["tolerations"]
    else:
        assert "nodeSelector" not in pod and "tolerations" not in pod


@requires_kubectl
@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_overlay_template_reads_back_into_a_valid_job(rendered, overlay, nodes):
    """What each overlay made of the template is something the launcher reads back exactly (nothing dropped),
    and the job it then builds passes the SDK models, the operator's rules and the stack's own checks."""
    objects = rendered[overlay]
    template = _template(objects)
    before = copy.deepcopy(template)
    spec = spec_from_template(
        template, image=IMAGE, command=["vilbert", "pretrain", "--output", "/data/x"], nodes=nodes
    )
    job = build_pytorchjob(spec)
    assert kc.pytorchjob_problems(job) == []
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == nodes and job["spec"]["elasticPolicy"]["minReplicas"] == nodes
    assert job["spec"]["runPolicy"]["suspend"] is False and "vilbert.io/template" not in job["metadata"]["labels"]
    assert job["metadata"]["namespace"] == "vilbert" and job["metadata"]["name"] != TEMPLATE_NAME
    expected_gpus = 8 if overlay == "gpu" else 0
    assert (spec.gpus_per_node, spec.procs_per_node) == (expected_gpus, expected_gpus or 1)
    pod = worker["template"]["spec"]
    assert kc.reference_problems(objects, "job", pod) == [] and kc.container_problems("job", pod) == []
    assert template == before, "reading must not change the template"


def _mutations():
    def pod(job):
        return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]

    def add_master(job, replicas):
        master = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Worker"])
        job["spec"]["pytorchReplicaSpecs"]["Master"] = {**master, "replicas": replicas}

    return {
        "no runPolicy": lambda j: j["spec"].pop("runPolicy"),
        "unknown spec field": lambda j: j["spec"].__setitem__("nprocPerNod", "8"),
        "replicas not an int": lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("replicas", "two"),
        "nprocPerNode an int": lambda j: j["spec"].__setitem__("nprocPerNode", 8),
        "container without name": lambda j: pod(j)["containers"][0].pop("name"),
        "two masters": lambda j: add_master(j, 2),
        "no pytorch container": lambda j: pod(j)["containers"][0].__setitem__("name", "trainer"),
        "elastic without Worker": lambda j: j["spec"]["pytorchReplicaSpecs"].pop("Worker"),
        "unknown pod field": lambda j: pod(j).__setitem__("nodeSelectr", {}),
        "GPU limit != nprocPerNode": lambda j: pod(j)["containers"][0]["resources"]["limits"].__setitem__(
            "nvidia.com/gpu", "3"
        ),
        "bad name": lambda j: j["metadata"].__setitem__("name", "Pretrain_1"),
        "min > max": lambda j: j["spec"]["elasticPolicy"].__setitem__("minReplicas", 5),
        "unknown replica type": lambda j: j["spec"]["pytorchReplicaSpecs"].__setitem__(
            "Chief", copy.deepcopy(j["spec"]["pytorchReplicaSpecs"]["Worker"])
        ),
        "no operator port": lambda j: pod(j)["containers"][0].pop("ports"),
        "bad restart policy": lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__(
            "restartPolicy", "Sometimes"
        ),
    }


@pytest.mark.parametrize("mutation", sorted(_mutations()))
def test_broken_job_fails_the_check(mutation):
    job = build_template(TEMPLATE_SPEC)
    job["spec"]["nprocPerNode"] = "1"
    assert kc.pytorchjob_problems(job) == [], "the unbroken job must pass, or this test shows nothing"
    _mutations()[mutation](job)
    assert kc.pytorchjob_problems(job) != [], f"{mutation} was not caught"


# ---------------------------------------------------------------------------------------------------------------
# RBAC of the pipeline


def _rules(objects: list[dict]) -> dict[tuple[str, str], set[str]]:
    return {
        (group, resource): set(rule["verbs"])
        for rule in kc.one(objects, "Role", "vilbert-pipeline")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


@requires_kubectl
def test_pipeline_role_grants_exactly_what_the_launcher_needs(rendered):
    rules = _rules(rendered["gpu"])
    assert rules == {
        ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get", "list", "watch"},
        ("", "events"): {"get", "list", "watch"},
    }
    binding = kc.one(rendered["gpu"], "RoleBinding", "vilbert-pipeline")
    subjects = {(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]}
    assert {
        ("ServiceAccount", "vilbert-pipeline", "vilbert"),
        ("ServiceAccount", "default-editor", "vilbert"),
    } <= subjects
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vilbert-pipeline"}


@requires_kubectl
def test_every_request_the_launcher_makes_is_allowed_by_the_role(rendered):
    """Replay a job that succeeds and one that times out (the latter deletes it); every REST call the launcher
    made through the real client must be allowed by the rendered Role. The replay is not a cluster: it answers
    with scripted objects (tests/infra/replay_cluster.py); what is checked here is which requests are sent."""
    rules = _rules(rendered["gpu"])
    spec = PyTorchJobSpec(image=IMAGE, command=("vilbert", "pretrain"), name="rbac-1", namespace="vilbert")
    op = OperatorStatus("vilbert", "rbac-1")
    pods = [("rbac-1-worker-0", "u0", "Running")]
    running = Frame(op.set("Running", 1), pods=pods, logs={"u0": ["2026-03-01T12:00:02Z hello"]})
    needs: set[tuple[str, str, str]] = set()
    with ReplayCluster([running, Frame(op.set("Succeeded", 2), pods=pods)]) as cluster:
        run_pytorchjob(spec, client=cluster.api(), poll_s=0, log=lambda _: None)
        needs |= rbac_needs(cluster.requests)
    with ReplayCluster([running]) as cluster, pytest.raises(PyTorchJobTimeout):
        run_pytorchjob(dataclasses.replace(spec, timeout_s=0.05), client=cluster.api(), poll_s=0.01, log=lambda _: None)
    needs |= rbac_needs(cluster.requests)
    assert {verb for _, _, verb in needs} == {"create", "get", "list", "delete"}, needs
    assert [need for need in needs if need[2] not in rules.get(need[:2], set())] == []


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_rbac_follows_a_changed_namespace_with_standalone_kfp(tmp_path, overlay):
    """A copy of an overlay with another namespace (standalone KFP: its own namespace) and the kfp-standalone
    component: every object and every RoleBinding subject lands in that namespace, pipeline-runner included."""
    tree = kc.prepare_tree(tmp_path)
    copy_dir = tree / "overlays" / f"{overlay}-kfp"
    shutil.copytree(tree / "overlays" / overlay, copy_dir)
    kustomization = yaml.safe_load((copy_dir / "kustomization.yaml").read_text())
    kustomization["namespace"] = "kubeflow"
    kustomization["components"].append("../../components/kfp-standalone")
    (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = kc.kustomize(tree, f"{overlay}-kfp")
    assert [o["metadata"]["name"] for o in kc.by_kind(objects, "Namespace")] == ["kubeflow"]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"kubeflow"}
    binding = kc.one(objects, "RoleBinding", "vilbert-pipeline")
    assert kc.schema_problems(binding) == []
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {
        ("vilbert-pipeline", "kubeflow"),
        ("default-editor", "kubeflow"),
        ("pipeline-runner", "kubeflow"),
    }
