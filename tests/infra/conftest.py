"""Fixtures shared by the infra tests."""

from __future__ import annotations

import shutil

import pytest

from tests.infra import k8s_checks as kc


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay rendered once, from a copy of infra/k8s with the secret env files made from the examples."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: the overlays cannot be rendered")
    tree = kc.prepare_tree(tmp_path_factory.mktemp("infra"))
    return {overlay: kc.kustomize(tree, overlay) for overlay in kc.OVERLAYS}
