"""Kubernetes client code: launching a training run as a Kubeflow Training Operator PyTorchJob and following it.

* :mod:`components.kube.pytorchjob_spec` — what a job is made of (:class:`PyTorchJobSpec`), validated;
* :mod:`components.kube.pytorchjob_manifest` — the PyTorchJob manifest of a spec, and a spec read back from the
  cluster's template (``infra/k8s/base/pytorchjob``);
* :mod:`components.kube.client` — the few Kubernetes API calls, through the official ``kubernetes`` client;
* :mod:`components.kube.pytorchjob` — ``run_pytorchjob(spec)``: create the job and follow it to the end.

The trainer (``components.training``) knows nothing of Kubernetes: inside each worker ``torchrun`` runs the same
``vilbert pretrain`` command that runs on one machine.
"""
