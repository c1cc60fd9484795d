"""The ``pytorchjob`` launcher: the manifest it builds, and how it follows a job.

There is no cluster here. Manifests are checked against the kubeflow-training SDK models, the Training
Operator's admission rules and the strict core pod schema (tests/infra/k8s_checks.py). Following is checked
against tests/infra/replay_cluster.py: a loopback HTTP server that REPLAYS scripted API answers (job statuses in
the operator's format, pods, logs, events) to the real ``kubernetes`` client. It is not a cluster: these tests
show that the launcher reacts correctly to each sequence, not that a cluster produces it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.kube.pytorchjob import (
    PvcMount,
    PyTorchJobError,
    PyTorchJobFailed,
    PyTorchJobSpec,
    PyTorchJobSpecError,
    PyTorchJobTimeout,
    TemplateMismatch,
    Toleration,
    build_pytorchjob,
    run_pytorchjob,
    spec_from_template,
)
from components.training.launch import free_port
from tests.infra import k8s_checks as kc
from tests.infra.replay_cluster import Frame, OperatorStatus, ReplayCluster, event, log_line

pytest.importorskip("kubeflow.training", reason="kubeflow-training is not installed (PyTorchJob models)")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (strict pod schema)")

NAME = "pt-run-1"


def gpu_spec(**changes) -> PyTorchJobSpec:
    base = PyTorchJobSpec(
        image="registry.example.com/vilbert-mlops@sha256:" + "a" * 64,
        command=("vilbert", "pretrain", "--dataset", "/data/datasets/cc", "--output", "/data/checkpoints/run-1"),
        name=NAME,
        namespace="vilbert",
        nodes=4,
        min_nodes=2,
        gpus_per_node=8,
        cpu_request="48",
        cpu_limit="64",
        memory_request="480Gi",
        memory_limit="640Gi",
        max_restarts=5,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=(Toleration("nvidia.com/gpu"), Toleration("pool", "Equal", "training", "NoExecute")),
        env={"NCCL_DEBUG": "WARN"},
        shm_size="128Gi",
        labels={"pipelines.kubeflow.org/run-id": "abc-123"},
        timeout_s=3600,
    )
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------------------------
# The manifest


@pytest.mark.parametrize(
    "spec",
    [
        PyTorchJobSpec(image="vilbert-mlops:0.1.0", command=["vilbert", "pretrain"], name="cpu-1"),
        gpu_spec(),
        gpu_spec(volumes=(PvcMount("out", "my-claim", "/out"),), env_from_secrets={}, env_from_config_maps=()),
    ],
    ids=["cpu-one-node", "gpu-four-nodes", "own-volume-no-stack-refs"],
)
def test_built_job_passes_the_sdk_models_the_operator_rules_and_strict_pod_schema(spec):
    assert kc.pytorchjob_problems(build_pytorchjob(spec)) == []


def test_built_job_has_the_elastic_worker_shape():
    job = build_pytorchjob(gpu_spec())
    spec = job["spec"]
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 4, "maxRestarts": 5}
    assert spec["nprocPerNode"] == "8" and "nProcPerNode" not in spec["elasticPolicy"]  # the deprecated field
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "ExitCode"
    run = spec["runPolicy"]
    assert run["suspend"] is False and run["activeDeadlineSeconds"] == 3600 + 600 and run["ttlSecondsAfterFinished"] > 0
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"].endswith("a" * 64)
    assert container["command"][:4] == ["torchrun", "--no-python", "vilbert", "pretrain"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "vilbert-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "vilbert-mlflow-client"
    assert container["envFrom"] == [{"configMapRef": {"name": "vilbert-config"}}]
    assert pod["tolerations"][1] == {"key": "pool", "operator": "Equal", "value": "training", "effect": "NoExecute"}
    assert job["metadata"]["labels"]["pipelines.kubeflow.org/run-id"] == "abc-123"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "Pretrain_1"}, "DNS-1035"),
        ({"name": "a" * 41}, "at most 40"),
        ({"min_nodes": 5}, "min_nodes"),
        ({"nodes": 0, "min_nodes": None}, "nodes must be >= 1"),
        ({"procs_per_node": 4}, "one process per GPU"),
        ({"cpu_request": "80"}, "cpu_request is above cpu_limit"),
        ({"memory_limit": "lots"}, "not a Kubernetes quantity"),
        ({"env": {"WORLD_SIZE": "8"}}, "set by the operator"),
        ({"env": {"AWS_ACCESS_KEY_ID": "x"}}, "defined twice"),
        ({"volumes": (PvcMount("scratch", "c", "/tmp"),)}, "mount paths must be unique"),
        ({"restart_policy": "Sometimes"}, "restart_policy"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"command": ()}, "command"),
        ({"image": "a b"}, "image"),
        ({"tolerations": (Toleration("k", "Exists", "v"),)}, "operator Equal"),
        ({"node_selector": {"bad key!": "x"}}, "label/selector"),
    ],
)
def test_bad_spec_is_refused_with_a_clear_message(changes, message):
    with pytest.raises(PyTorchJobSpecError, match=message):
        gpu_spec(**changes)


def test_generated_names_are_unique_valid_and_short():
    names = {PyTorchJobSpec(image="i:1", command=("x",)).name for _ in range(20)}
    assert len(names) == 20
    assert all(name.startswith("vilbert-pretrain-") and len(name) <= 40 for name in names)
    assert kc.pytorchjob_problems(build_pytorchjob(PyTorchJobSpec(image="i:1", command=("x",), name=min(names)))) == []
    with pytest.raises(PyTorchJobSpecError, match="name_prefix"):
        PyTorchJobSpec(image="i:1", command=("x",), name_prefix="Bad_Prefix")


def test_a_job_reads_back_into_the_same_spec():
    spec = gpu_spec()
    assert spec_from_template(build_pytorchjob(spec), name=spec.name) == spec
    # As `kubectl get -o json` returns it after `kubectl apply`: server fields, apply annotation, status.
    stored = build_pytorchjob(spec)
    stored["metadata"].update(uid="u", resourceVersion="7", creationTimestamp="2026-03-01T12:00:00Z", generation=1)
    stored["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
    stored["status"] = {"conditions": [{"type": "Suspended", "status": "True"}]}
    assert spec_from_template(stored, name=spec.name) == spec


def test_reading_a_template_lets_derived_values_follow_the_overrides():
    template = build_pytorchjob(gpu_spec(min_nodes=None, procs_per_node=None))
    spec = spec_from_template(template, nodes=3, gpus_per_node=4, command=["vilbert", "pretrain", "--x"])
    assert (spec.nodes, spec.min_nodes, spec.gpus_per_node, spec.procs_per_node) == (3, 3, 4, 4)
    assert spec.name != NAME and spec.name.startswith("vilbert-pretrain-")
    assert spec.command == ("vilbert", "pretrain", "--x") and spec.namespace == "vilbert"


def test_a_template_with_something_the_builder_cannot_write_is_refused():
    template = build_pytorchjob(gpu_spec())
    pod = template["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    sidecar = copy.deepcopy(template)
    sidecar["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"].append(
        {"name": "x", "image": "y"}
    )
    host_path = copy.deepcopy(template)
    host_path["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"].append(
        {"name": "host", "hostPath": {"path": "/"}}
    )
    annotated = copy.deepcopy(template)
    annotated["metadata"]["annotations"] = {"team.example.com/cost-center": "ml"}
    privileged = copy.deepcopy(template)
    privileged["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    with pytest.raises(TemplateMismatch, match=r"containers"):
        spec_from_template(sidecar)
    with pytest.raises(TemplateMismatch, match=r"volumes\[5\]"):
        spec_from_template(host_path)
    with pytest.raises(TemplateMismatch, match=r"securityContext.runAsUser: template 0"):
        spec_from_template(privileged)
    with pytest.raises(TemplateMismatch, match=r"metadata.annotations: in the template"):
        spec_from_template(annotated)
    with pytest.raises(TemplateMismatch, match="understands"):
        spec_from_template({"spec": {}, "metadata": {}})
    assert pod["securityContext"]["runAsUser"] == 10001  # the original is untouched
    with pytest.raises(PyTorchJobSpecError, match="unexpected keyword"):
        spec_from_template(template, gpus=3)


@pytest.mark.slow
def test_container_command_with_the_operators_variables_starts_torchrun_workers():
    """Run the built container command here, with the PET_* variables the operator gives a one-node job (it
    cannot resolve <name>-worker-0 here, so the rendezvous endpoint is on loopback): torchrun must start
    nprocPerNode processes that see themselves as torchrun workers, as ``components.training.launch`` expects."""
    probe = (
        "from components.training.distributed import under_torchrun, dist_info_from_env; "
        "import sys; i = dist_info_from_env(); "
        "sys.stdout.write(f'probe {under_torchrun()} {i.rank} {i.world_size}\\n'); sys.stdout.flush()"
    )  # one write per line: print() writes its parts separately, and two workers share the pipe
    job = build_pytorchjob(PyTorchJobSpec(image="i:1", command=(sys.executable, "-c", probe), name="probe-1"))
    command = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    command[0] = str(Path(sys.executable).with_name(command[0]))  # this venv's torchrun
    env = {
        **os.environ,
        "PET_NNODES": f"{job['spec']['elasticPolicy']['minReplicas']}:{job['spec']['elasticPolicy']['maxReplicas']}",
        "PET_RDZV_BACKEND": job["spec"]["elasticPolicy"]["rdzvBackend"],
        "PET_RDZV_ENDPOINT": f"localhost:{free_port()}",
        "PET_NPROC_PER_NODE": "2",  # as nprocPerNode "2" would
        "PET_MAX_RESTARTS": str(job["spec"]["elasticPolicy"]["maxRestarts"]),
        "PYTHONUNBUFFERED": "1",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probes = sorted(line for line in done.stdout.splitlines() if line.startswith("probe"))
    assert probes == ["probe True 0 2", "probe True 1 2"]


# ---------------------------------------------------------------------------------------------------------------
# Following a job: replayed API answers (NOT a cluster, see the module docstring)


def spec(**changes) -> PyTorchJobSpec:
    return dataclasses.replace(
        PyTorchJobSpec(image="vilbert-mlops:0.1.0", command=("vilbert", "pretrain"), name=NAME, namespace="vilbert"),
        **changes,
    )


def pods(phase0: str, phase1: str = "", uid0: str = "w0") -> list[tuple[str, str, str]]:
    out = [(f"{NAME}-worker-0", uid0, phase0)]
    return out + ([(f"{NAME}-worker-1", "w1", phase1)] if phase1 else [])


def run(cluster: ReplayCluster, job: PyTorchJobSpec | None = None, **kwargs):
    lines: list[str] = []
    kwargs.setdefault("poll_s", 0)
    outcome = run_pytorchjob(job or spec(), client=cluster.api(), log=lines.append, **kwargs)
    return outcome, lines


def test_success_streams_each_log_line_once_and_returns_the_outcome():
    op = OperatorStatus("vilbert", NAME)
    log0 = [log_line(10, "rank 0: step 1 loss 9.1"), log_line(10.5, "rank 0: step 2 loss 8.7")]
    log1 = [log_line(11.25, "rank 8: joined")]
    unschedulable = event(
        "e1", "Pod", f"{NAME}-worker-1", "FailedScheduling", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )
    frames = [
        Frame(op.set("Created", 0), pods=pods("Pending", "Pending"), events=[unschedulable]),
        Frame(
            op.set("Running", 8),
            {"Worker": {"active": 1}},
            pods("Running", "Pending"),
            {"w0": log0},
            [unschedulable, event("e2", "Pod", "someone-else-worker-0", "BackOff", "not ours")],
        ),
        Frame(op.snapshot(), {"Worker": {"active": 2}}, pods("Running", "Running"), {"w0": log0, "w1": log1}),
        Frame(
            op.set("Succeeded", 30),
            {"Worker": {"succeeded": 2}},
            pods("Succeeded", "Succeeded"),
            {"w0": [*log0, log_line(29, "saved final/")], "w1": log1},
            [event("e3", "PyTorchJob", NAME, "PyTorchJobSucceeded", "done", type_="Normal")],
        ),
    ]
    with ReplayCluster(frames) as cluster:
        outcome, lines = run(cluster)
        assert not cluster.deleted
        log_reads = [q for m, p, q in cluster.requests if p.endswith(f"{NAME}-worker-0/log")]
    worker_lines = [line for line in lines if line.startswith("[worker")]
    assert worker_lines == [
        "[worker-0] rank 0: step 1 loss 9.1",
        "[worker-0] rank 0: step 2 loss 8.7",
        "[worker-1] rank 8: joined",
        "[worker-0] saved final/",
    ]
    assert [line for line in lines if "warning event" in line] == [
        f"warning event: {NAME}-worker-1: FailedScheduling: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    ]
    assert [c[0] for c in outcome.conditions] == ["Created", "Running", "Succeeded"]
    assert outcome.conditions[-1][1:] == ("PyTorchJobSucceeded", f"PyTorchJob vilbert/{NAME} successfully completed.")
    assert outcome.restarts_seen == 0 and outcome.replica_statuses == {"Worker": {"succeeded": 2}}
    assert outcome.log_tail[-1] == "[worker-0] saved final/" and outcome.name == NAME
    assert "sinceSeconds" not in log_reads[0] and all("sinceSeconds" in q for q in log_reads[1:])
    # The client writes Python's "True"; the API server parses it with Go's strconv.ParseBool, which accepts it.
    assert all(q["container"] == ["pytorch"] and q["timestamps"] == ["True"] for q in log_reads)


def test_failure_raises_with_the_operator_reason_and_the_log_tail():
    op = OperatorStatus("vilbert", NAME)
    crash = [
        log_line(5, "rank 0: step 1"),
        log_line(6, "Traceback (most recent call last):"),
        log_line(6, "ValueError: NaN loss"),
    ]
    frames = [
        Frame(op.set("Created", 0)),
        Frame(op.set("Running", 3), {"Worker": {"active": 1}}, pods("Running"), {"w0": crash[:1]}),
        Frame(op.set("Failed", 7), {"Worker": {"failed": 1}}, pods("Failed"), {"w0": crash}),
    ]
    with ReplayCluster(frames) as cluster, pytest.raises(PyTorchJobFailed) as failed:
        run(cluster, tail_lines=2)
    error = failed.value
    assert (
        error.reason == "PyTorchJobFailed"
        and error.message == f"PyTorchJob {NAME} is failed because 1 Worker replica(s) failed."
    )
    assert error.log_tail == ("[worker-0] Traceback (most recent call last):", "[worker-0] ValueError: NaN loss")
    assert "ValueError: NaN loss" in str(error) and "PyTorchJobFailed" in str(error)
    assert not cluster.deleted, "a failed job is kept (until its TTL) for inspection"


def test_restarting_then_success_counts_the_restart_and_reads_the_recreated_pod():
    op = OperatorStatus("vilbert", NAME)
    first = [log_line(5, "start"), log_line(9, "killed: preempted")]
    second = [log_line(20, "start"), log_line(21, "resumed from checkpoint step 500")]
    frames = [
        Frame(op.set("Created", 0)),
        Frame(op.set("Running", 3), {"Worker": {"active": 1}}, pods("Running"), {"w0": first}),
        Frame(op.set("Restarting", 10), {"Worker": {"failed": 1}}, pods("Failed"), {"w0": first}),
        Frame(op.set("Running", 19), {"Worker": {"active": 1}}, pods("Running", uid0="w0-b"), {"w0-b": second}),
        Frame(op.set("Succeeded", 40), {"Worker": {"succeeded": 1}}, pods("Succeeded", uid0="w0-b"), {"w0-b": second}),
    ]
    with ReplayCluster(frames) as cluster:
        outcome, lines = run(cluster)
    assert [c[0] for c in outcome.conditions] == ["Created", "Running", "Restarting", "Running", "Succeeded"]
    assert outcome.restarts_seen == 1
    assert outcome.conditions[2][2] == f"PyTorchJob {NAME} is restarting because 1 Worker replica(s) failed."
    assert [line for line in lines if line.startswith("[worker")] == [
        "[worker-0] start",
        "[worker-0] killed: preempted",
        "[worker-0] start",
        "[worker-0] resumed from checkpoint step 500",
    ]


def test_timeout_deletes_the_job_and_says_why_it_hung():
    op = OperatorStatus("vilbert", NAME)
    stuck = event(
        "e9", "Pod", f"{NAME}-worker-0", "FailedScheduling", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    )
    frames = [Frame(op.set("Created", 0), pods=pods("Pending"), events=[stuck])]
    with ReplayCluster(frames) as cluster, pytest.raises(PyTorchJobTimeout) as timed_out:
        run(cluster, spec(timeout_s=0.3), poll_s=0.02)
    assert cluster.deleted and cluster.requests[-1][0] == "DELETE"
    assert timed_out.value.state == "Created" and "Insufficient nvidia.com/gpu" in str(timed_out.value)
    assert cluster.polls >= 3, "it polled until the deadline"


def test_transient_api_errors_are_retried_and_persistent_ones_fail_and_clean_up():
    op = OperatorStatus("vilbert", NAME)
    flaky = [
        Frame(op.set("Created", 0)),
        Frame([], job_error=503),
        Frame(op.set("Succeeded", 5), {"Worker": {"succeeded": 1}}),
    ]
    with ReplayCluster(flaky) as cluster:
        outcome, lines = run(cluster)
    assert outcome.conditions[-1][0] == "Succeeded" and any("retrying, 1/5" in line for line in lines)

    down = [Frame(OperatorStatus("vilbert", NAME).set("Created", 0))] + [Frame([], job_error=503)] * 10
    with ReplayCluster(down) as cluster, pytest.raises(PyTorchJobError, match="503"):
        run(cluster)
    assert cluster.deleted, "a job nobody follows any more must not keep the GPUs"


@pytest.mark.parametrize(
    ("code", "hint"),
    [(403, "RoleBinding vilbert-pipeline"), (404, "Training Operator"), (409, "exists already")],
)
def test_create_errors_say_what_to_do(code, hint):
    with ReplayCluster([], create_error=code) as cluster, pytest.raises(PyTorchJobError, match=hint):
        run(cluster)


def test_a_job_deleted_by_someone_else_is_reported():
    op = OperatorStatus("vilbert", NAME)
    with ReplayCluster([Frame(op.set("Created", 0)), Frame(op.set("Running", 2))]) as cluster:
        lines: list[str] = []

        def delete_after_running(line: str) -> None:
            lines.append(line)
            if "Running" in line:
                cluster.deleted = True  # as `kubectl delete pytorchjob` would

        with pytest.raises(PyTorchJobError, match="disappeared"):
            run_pytorchjob(spec(), client=cluster.api(), poll_s=0, log=delete_after_running)


def test_the_job_sent_over_the_wire_is_valid():
    op = OperatorStatus("vilbert", NAME)
    with ReplayCluster([Frame(op.set("Succeeded", 1))]) as cluster:
        run(cluster, gpu_spec(name=NAME))
        sent = cluster.created
    assert sent is not None
    sent = {k: v for k, v in sent.items()}
    sent["metadata"] = {k: v for k, v in sent["metadata"].items() if k not in ("uid", "creationTimestamp")}
    assert sent == build_pytorchjob(gpu_spec(name=NAME)) and kc.pytorchjob_problems(sent) == []


def test_replayed_statuses_have_the_operators_format():
    """The replay's conditions are what the SDK's typed JobStatus model reads back unchanged (field names, types),
    and they follow the operator's rules: Running and Restarting replace each other; success turns Running False."""
    from kubeflow.training import ApiClient

    op = OperatorStatus("vilbert", NAME)
    for kind in ("Created", "Running", "Restarting", "Running"):
        op.set(kind, 1)
    final = op.set("Succeeded", 2)
    client = ApiClient()
    status = {"conditions": final, "replicaStatuses": {"Worker": {"succeeded": 1}}, "startTime": "2026-03-01T12:00:00Z"}
    model = client.deserialize(kc._Response(status), "KubeflowOrgV1JobStatus")
    again = client.sanitize_for_serialization(model)

    def same_instant(c: dict) -> dict:  # the SDK writes the times back as +00:00 instead of Z
        return {k: dt.datetime.fromisoformat(v) if k.endswith("Time") else v for k, v in c.items()}

    assert [same_instant(c) for c in again["conditions"]] == [same_instant(c) for c in final]
    assert again["replicaStatuses"] == status["replicaStatuses"]
    assert [(c["type"], c["status"]) for c in final] == [
        ("Created", "True"),
        ("Running", "False"),
        ("Succeeded", "True"),
    ]
    assert op.set("Failed", 3) == op.set("Running", 4), "nothing changes after Failed"


# ---------------------------------------------------------------------------------------------------------------
# Connecting


def test_kubeconfig_is_used_outside_a_cluster(tmp_path, monkeypatch):
    op = OperatorStatus("team-a", NAME)
    with ReplayCluster([Frame(op.set("Succeeded", 1))]) as cluster:
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "replay", "cluster": {"server": cluster.url}}],
            "users": [{"name": "me", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "ctx", "context": {"cluster": "replay", "user": "me", "namespace": "team-a"}}],
            "current-context": "ctx",
        }
        (tmp_path / "config").write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        outcome = run_pytorchjob(spec(namespace=None), poll_s=0, log=lambda _: None)
        assert outcome.namespace == "team-a"
        assert cluster.requests[0][:2] == ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs")


def test_no_cluster_and_no_kubeconfig_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(PyTorchJobError, match="no Kubernetes configuration"):
        run_pytorchjob(spec(), poll_s=0, log=lambda _: None)
