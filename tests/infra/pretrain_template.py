"""The pretrain PyTorchJob template of infra/k8s/base is generated from the launcher's own builder.

``components.kube.pytorchjob.build_template(TEMPLATE_SPEC)`` is the one source of the job's shape; the YAML
file is its output plus a header. ``test_manifests.py`` fails when they differ. After changing the builder or the
spec below, regenerate the file with::

    .venv/bin/python -m tests.infra.pretrain_template
"""

from __future__ import annotations

from pathlib import Path

import yaml

from components.kube.pytorchjob import TEMPLATE_NAME, PyTorchJobSpec, Toleration, build_template

TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base" / "pytorchjob" / "pretrain-template.yaml"

#: The base template: one node with one GPU of the NVIDIA GPU operator's default label and taint. The overlays
#: patch what depends on the cluster (GPUs per node, node selector, tolerations, sizes).
TEMPLATE_SPEC = PyTorchJobSpec(
    name=TEMPLATE_NAME,
    image="registry.example.com/vilbert-mlops:0.1.0-cuda",
    command=("vilbert", "pretrain", "--help"),
    gpus_per_node=1,
    node_selector={"nvidia.com/gpu.present": "true"},
    tolerations=(Toleration("nvidia.com/gpu", "Exists", "", "NoSchedule"),),
)

HEADER = """\
# GENERATED from components/kube/pytorchjob_manifest.py (build_template) and TEMPLATE_SPEC in
# tests/infra/pretrain_template.py: do not edit by hand; regenerate with
#   .venv/bin/python -m tests.infra.pretrain_template
# (tests/infra fails while this file and the builder disagree).
#
# The PyTorchJob TEMPLATE of the pretrain step (Kubeflow Training Operator, kubeflow.org/v1). Applied with the
# stack SUSPENDED (runPolicy.suspend: true): the operator creates no pod for it. Each overlay shapes it for its
# cluster with JSON patches (GPUs per node, node selector, tolerations, sizes), and the pretrain step reads that
# shape back, in the cluster or from an overlay's rendering:
#   spec = spec_from_template(fetch_template(namespace), image=..., command=[...], nodes=N)
#   run_pytorchjob(spec)
# spec_from_template refuses a template that build_pytorchjob would not reproduce exactly, so a patch that adds
# something the builder does not know (an extra container, a hostPath volume, ...) fails loudly instead of being
# dropped: teach the builder first.
#
# Shape: elastic (c10d rendezvous at <name>-worker-0, minReplicas..maxReplicas nodes, maxRestarts worker-group
# restarts by torchrun), Worker replicas only, restartPolicy ExitCode (retry pods killed by signals, exit codes
# 128+; fail on 1-127), one container `pytorch` running `torchrun --no-python <command>` (torchrun reads the
# operator's PET_* variables), /dev/shm as a memory emptyDir, a writable /tmp, the stack's PVCs, ConfigMap
# vilbert-config and the S3 / MLflow credentials as environment variables, a non-root read-only container.
"""


def render() -> str:
    """The file's content: header and the builder's template as YAML."""
    return HEADER + yaml.safe_dump(build_template(TEMPLATE_SPEC), sort_keys=False, width=120)


if __name__ == "__main__":
    TEMPLATE_FILE.write_text(render())
    print(f"wrote {TEMPLATE_FILE}")
