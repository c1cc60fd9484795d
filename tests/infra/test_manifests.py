"""Offline checks of infra/k8s: every overlay renders, validates strictly and follows the project's rules.

Rendering needs `kubectl` (its built-in kustomize); the core objects are validated with kubernetes-validate's
strict schemas of a pinned Kubernetes version; the PyTorchJob (a custom resource, unknown to those schemas)
with the kubeflow-training SDK models and the Training Operator's admission rules (tests/infra/k8s_checks.py).
The training side (PyTorchJob template, RBAC of the pipeline) is in test_training_infra.py.
"""

from __future__ import annotations

import base64
import configparser
import copy
import re
import subprocess

import pytest
import yaml

from tests.infra import k8s_checks as kc

pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (strict schema checks)")
pytest.importorskip("kubeflow.training", reason="kubeflow-training is not installed (PyTorchJob models)")

requires_kubectl = kc.requires_kubectl


# ---------------------------------------------------------------------------------------------------------------
# Rendering and strict schemas


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_overlay_renders_the_whole_stack(rendered, overlay):
    kinds = {(o["kind"], kc.base_name(o)) for o in rendered[overlay]}
    expected = {
        ("Namespace", "vilbert"),
        ("ConfigMap", "vilbert-config"),
        ("Deployment", "vilbert-mlflow"),
        ("Service", "vilbert-mlflow"),
        ("StatefulSet", "vilbert-postgres"),
        ("Service", "vilbert-postgres"),
        ("StatefulSet", "vilbert-minio"),
        ("Service", "vilbert-minio"),
        ("Job", "vilbert-minio-setup"),
        ("Job", "vilbert-mlflow-user"),
        ("PersistentVolumeClaim", "vilbert-datasets"),
        ("PersistentVolumeClaim", "vilbert-features"),
        ("PersistentVolumeClaim", "vilbert-checkpoints"),
        ("ServiceAccount", "vilbert-pipeline"),
        ("Role", "vilbert-pipeline"),
        ("RoleBinding", "vilbert-pipeline"),
        ("PyTorchJob", "vilbert-pretrain-template"),
    }
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    namespaced = [o for o in rendered[overlay] if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"vilbert"}


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_core_objects_validate_strictly(rendered, overlay):
    """Every object but the custom resources against the strict schema (no unknown field, right types)."""
    problems = []
    for obj in rendered[overlay]:
        if (obj["apiVersion"], obj["kind"]) in kc.CRD_KINDS:
            continue
        problems += kc.schema_problems(obj)
    assert problems == []


@requires_kubectl
def test_strict_schema_check_catches_a_typo_and_a_wrong_type(rendered):
    deployment = kc.one(rendered["local"], "Deployment", "vilbert-mlflow")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "2"
    assert "resourcez" in " ".join(kc.schema_problems(typo))
    assert "spec.replicas" in " ".join(kc.schema_problems(wrong_type))


@requires_kubectl
def test_only_the_pytorchjob_is_a_custom_resource(rendered):
    """The CRD skip list must not hide a core object: everything else has a schema."""
    import kubernetes_validate

    for obj in rendered["gpu"]:
        if (obj["apiVersion"], obj["kind"]) in kc.CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, kc.K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Pods: resources, security, images, probes, references


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_every_container_is_limited_non_root_and_pinned(rendered, overlay):
    problems = []
    pods = 0
    for obj in rendered[overlay]:
        for label, pod in kc.pod_specs(obj):
            pods += 1
            problems += kc.container_problems(label, pod)
            if pod.get("automountServiceAccountToken") is not False:
                problems.append(f"{label}: mounts a service account token it does not need")
    assert pods >= 6  # mlflow, postgres, minio, two setup jobs, the PyTorchJob's Worker
    assert problems == []


def test_container_check_catches_latest_root_and_missing_limits():
    pod = {
        "containers": [
            {"name": "bad", "image": "busybox:latest", "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}
        ]
    }
    problems = " | ".join(kc.container_problems("Pod/x", pod))
    for expected in ("not pinned", "no memory limit", "above its limit", "runAsNonRoot", "writable"):
        assert expected in problems
    assert not kc.image_pinned("busybox")
    assert kc.image_pinned("registry:5000/team/app:1.2") and kc.image_pinned("app@sha256:" + "0" * 64)
    assert not kc.image_pinned("registry:5000/team/app")


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_references_resolve(rendered, overlay):
    """ConfigMaps, Secrets, their keys, PVCs and $(VAR)s that pods use all exist in the same rendering."""
    objects = rendered[overlay]
    problems = []
    for obj in objects:
        for label, pod in kc.pod_specs(obj):
            problems += kc.reference_problems(objects, label, pod)
    assert problems == []


@requires_kubectl
def test_reference_check_catches_a_missing_key(rendered):
    objects = rendered["local"]
    deployment = copy.deepcopy(kc.one(objects, "Deployment", "vilbert-mlflow"))
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "POSTGRES_DB")["valueFrom"]["configMapKeyRef"]["key"] = "POSTGRES_DATABASE"
    env[:] = [e for e in env if e["name"] != "MLFLOW_ALLOWED_HOSTS"]
    problems = " | ".join(kc.reference_problems(objects, "d", deployment["spec"]["template"]["spec"]))
    assert "no key POSTGRES_DATABASE" in problems and "$(MLFLOW_ALLOWED_HOSTS)" in problems


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_services_have_probes_and_select_their_pods(rendered, overlay):
    objects = rendered[overlay]
    problems = []
    for kind in ("Deployment", "StatefulSet"):
        for obj in kc.by_kind(objects, kind):
            problems += kc.probe_problems(f"{kind}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"])
    workloads = kc.by_kind(objects, "Deployment") + kc.by_kind(objects, "StatefulSet")
    for service in kc.by_kind(objects, "Service"):
        selector = service["spec"]["selector"].items()
        matches = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} workloads"
        ports = {p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: target port {port['targetPort']}"
    assert problems == []


# ---------------------------------------------------------------------------------------------------------------
# Secrets: templates only


SECRETS = kc.K8S / "components" / "secrets"


def _generators(section: str) -> list[dict]:
    kustomization = yaml.safe_load((SECRETS / "kustomization.yaml").read_text())
    return kustomization.get(section, [])


@pytest.mark.skipif(not kc.in_git_checkout(), reason="needs git and a git checkout (e.g. not inside an image)")
def test_secrets_come_only_from_gitignored_env_files_with_committed_examples():
    sources = [src for gen in _generators("secretGenerator") for src in gen.get("envs", []) + gen.get("files", [])]
    assert sources, "no secretGenerator"
    for source in sources:
        real = SECRETS / source.split("=")[-1]
        assert real.suffix == ".env", source
        assert real.with_name(real.name + ".example").is_file(), f"{source}: no committed .example"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=kc.ROOT)
        assert ignored.returncode == 0, f"{real} is not gitignored"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(real)], cwd=kc.ROOT, capture_output=True)
        assert tracked.returncode != 0, f"{real} is committed"
    for path in kc.K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            is_op_list = isinstance(doc, list)  # JSON patches
            assert is_op_list or not doc or doc.get("kind") != "Secret", f"{path}: a Secret object in git"


def test_secret_examples_hold_placeholders_only():
    for example in SECRETS.glob("*.env.example"):
        for line in example.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            key, value = line.split("=", 1)
            if re.search(r"PASSWORD|SECRET|_KEY", key):
                assert value.startswith("CHANGE_ME"), f"{example.name}: {key} is not a CHANGE_ME placeholder"


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_rendered_secrets_are_the_generated_templates(rendered, overlay):
    secrets = kc.by_kind(rendered[overlay], "Secret")
    assert {kc.base_name(s) for s in secrets} == {g["name"] for g in _generators("secretGenerator")}
    problems = []
    for secret in secrets:
        problems += kc.secret_value_problems(secret, allowed_plain={"admin", "vilbert-pipeline"})
    assert problems == []
    config = kc.one(rendered[overlay], "ConfigMap", "vilbert-config")["data"]
    assert not [k for k in config if re.search(r"PASSWORD|SECRET_ACCESS|TOKEN", k)], "a secret in the ConfigMap"


def test_secret_check_catches_a_real_looking_value():
    def secret(**values):
        data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
        return {"kind": "Secret", "metadata": {"name": "s"}, "data": data}

    assert kc.secret_value_problems(secret(AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7MDENG")) != []
    assert kc.secret_value_problems(secret(TOKEN_VALUE="hunter2")) != []
    assert kc.secret_value_problems(secret(SOMETHING="Zq81hXk29sLmQ0")) != []
    assert kc.secret_value_problems(secret(MLFLOW_TRACKING_PASSWORD="CHANGE_ME_x", USER="admin")) == []


# ---------------------------------------------------------------------------------------------------------------
# MLflow, PostgreSQL, MinIO wiring


@requires_kubectl
@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_mlflow_server_is_wired_to_postgres_minio_and_basic_auth(rendered, overlay):
    objects = rendered[overlay]
    config = kc.one(objects, "ConfigMap", "vilbert-config")["data"]
    container = kc.one(objects, "Deployment", "vilbert-mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "server" and "--app-name=basic-auth" in args and "--serve-artifacts" in args
    assert "--backend-store-uri=postgresql+psycopg2://$(POSTGRES_USER)@vilbert-postgres:5432/$(POSTGRES_DB)" in args
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "POSTGRES_PASSWORD"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    assert not [a for a in args if "PASSWORD" in a], "a password in the process arguments"
    # The artifact destination is a bucket that the setup Job creates, on the MinIO Service.
    bucket = config["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://").split("/")[0]
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and bucket in config["VILBERT_BUCKETS"].split()
    minio = kc.one(objects, "Service", "vilbert-minio")
    s3_port = next(p["port"] for p in minio["spec"]["ports"] if p["name"] == "s3")
    assert config["MLFLOW_S3_ENDPOINT_URL"] == config["AWS_ENDPOINT_URL"] == f"http://vilbert-minio:{s3_port}"
    mlflow_port = kc.one(objects, "Service", "vilbert-mlflow")["spec"]["ports"][0]["port"]
    assert config["MLFLOW_TRACKING_URI"] == f"http://vilbert-mlflow:{mlflow_port}"
    assert "vilbert-mlflow" in config["MLFLOW_ALLOWED_HOSTS"].split(",")


@requires_kubectl
def test_auth_store_matches_the_postgres_settings(rendered):
    """basic_auth.ini cannot expand variables: its role, host and database must match the other settings."""
    objects = rendered["gpu"]
    config = kc.one(objects, "ConfigMap", "vilbert-config")["data"]
    ini = configparser.ConfigParser()
    ini.read_string(kc.one(objects, "ConfigMap", "vilbert-mlflow-auth-config")["data"]["basic_auth.ini"])
    uri = ini["mlflow"]["database_uri"]
    match = re.fullmatch(r"postgresql\+psycopg2://([^:@/]+)@([^:/]+):5432/(\w+)", uri)
    assert match, f"{uri}: no password in the URI, role@host:5432/db expected"
    role, host, database = match.groups()
    assert role == config["POSTGRES_USER"] and host == "vilbert-postgres"
    init_sql = kc.one(objects, "ConfigMap", "vilbert-postgres-init")["data"]
    assert f"CREATE DATABASE {database};" in "".join(init_sql.values())
    assert database != config["POSTGRES_DB"]  # separate from the tracking store's migrations


@requires_kubectl
def test_overlays_size_the_cluster(rendered):
    def claims(overlay):
        return {
            o["metadata"]["name"]: (o["spec"]["accessModes"], o["spec"]["resources"]["requests"]["storage"])
            for o in kc.by_kind(rendered[overlay], "PersistentVolumeClaim")
        }

    from kubernetes.utils import parse_quantity

    local, gpu = claims("local"), claims("gpu")
    assert set(local) == set(gpu) == {"vilbert-datasets", "vilbert-features", "vilbert-checkpoints"}
    for name in local:
        assert local[name][0] == ["ReadWriteOnce"] and gpu[name][0] == ["ReadWriteMany"]
        assert parse_quantity(gpu[name][1]) > parse_quantity(local[name][1])
    gpus = {o: kc.one(rendered[o], "ConfigMap", "vilbert-config")["data"]["VILBERT_GPUS_PER_NODE"] for o in kc.OVERLAYS}
    assert gpus == {"local": "0", "gpu": "8"}
