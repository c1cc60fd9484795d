"""Orchestration of the components: the Kubeflow pipeline (and, through dvc.yaml, DVC)."""
