"""Offline checks of infra/docker and .dockerignore (there is no Docker engine here, so the files are parsed)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.infra import dockerfiles as df
from tests.infra.k8s_checks import K8S, ROOT, image_pinned, in_git_checkout

DOCKER = ROOT / "infra" / "docker"
COMPONENT_IMAGES = ("Dockerfile", "Dockerfile.cuda")
ALL_IMAGES = (*COMPONENT_IMAGES, "Dockerfile.mlflow")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _parsed(name: str) -> df.Dockerfile:
    return df.parse(DOCKER / name)


def _final(dockerfile: df.Dockerfile) -> df.Stage:
    return dockerfile.stages[-1]


def _pip_installs(dockerfile: df.Dockerfile) -> list[list[str]]:
    """The arguments of every `pip install` in every RUN, as token lists."""
    found = []
    for stage in dockerfile.stages:
        for run in stage.values("RUN"):
            for command in re.split(r"&&|;", run):
                tokens = shlex.split(command)
                if tokens[:2] == ["pip", "install"]:
                    found.append(tokens[2:])
    return found


def _lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {line!r} is not an exact pin"
        pins[requirement.name.lower()] = specs[0].version
    return pins


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_base_images_are_pinned(name):
    dockerfile = _parsed(name)
    for stage in dockerfile.stages:
        if dockerfile.parent(stage) is not None:
            continue
        image = dockerfile.expand(stage, stage.base)
        assert "$" not in image and image_pinned(image), f"{name}: FROM {image} is not pinned"
    text = (DOCKER / name).read_text()
    assert "@sha256:<digest>" in text and "imagetools inspect" in text, f"{name}: no note on digest pinning"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_every_pip_install_is_locked_or_pinned(name):
    """No resolution at build time: locks with --no-deps, the project with --no-deps, or exact pins."""
    installs = _pip_installs(_parsed(name))
    assert installs, f"{name}: no pip install"
    for args in installs:
        if "-r" in args:
            assert "--no-deps" in args, f"{name}: pip install {' '.join(args)} may resolve beyond the lock"
        elif "." in args:
            assert "--no-deps" in args, f"{name}: the project is installed with dependency resolution"
        else:
            packages = [a for a in args if not a.startswith("-")]
            assert packages and all(re.fullmatch(r"[\w.\-\[\]]+==[\w.\-+]+", p) for p in packages), args


@pytest.mark.parametrize("name", COMPONENT_IMAGES)
def test_component_images_install_the_lock_then_the_project(name):
    dockerfile = _parsed(name)
    builder = dockerfile.stage("builder")
    assert "requirements.lock ./" in builder.values("COPY")
    installs = _pip_installs(dockerfile)
    lock_install = next(i for i in installs if "-r" in i)
    assert lock_install[lock_install.index("-r") + 1] == "requirements.lock"
    assert any("." in i and "--no-deps" in i for i in installs)
    assert any("pip check" in run for run in builder.values("RUN")), "the lock's completeness is not checked"
    # setuptools is installed pinned for the no-isolation build: the pin must satisfy the build backend's range.
    setuptools_pin = next(a.split("==")[1] for i in installs for a in i if a.startswith("setuptools=="))
    for requirement in map(Requirement, PYPROJECT["build-system"]["requires"]):
        if requirement.name == "setuptools":
            assert setuptools_pin in requirement.specifier


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_final_stage_runs_as_a_created_non_root_user(name):
    dockerfile = _parsed(name)
    final = _final(dockerfile)
    user = dockerfile.effective(final, "USER")
    assert user is not None, f"{name}: the image runs as root"
    uid = dockerfile.expand(final, user).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user} is root or not numeric (runAsNonRoot needs a uid)"
    created = [
        dockerfile.expand(s, run) for s in dockerfile.lineage(final) for run in s.values("RUN") if "useradd" in run
    ]
    assert any(f"--uid {uid}" in run for run in created), f"{name}: no useradd --uid {uid}"
    assert "pip" not in " ".join(final.values("RUN")), "the runtime stage must not install anything"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_entrypoint(name):
    dockerfile = _parsed(name)
    entrypoint = df.exec_form(dockerfile.effective(_final(dockerfile), "ENTRYPOINT"))
    assert entrypoint == (["mlflow"] if name == "Dockerfile.mlflow" else ["vilbert"])
    assert PYPROJECT["project"]["scripts"]["vilbert"] == "pipelines.cli:app"


def test_test_stage_is_not_the_default_target():
    dockerfile = _parsed("Dockerfile")
    assert dockerfile.stage("test").base == "runtime"
    assert dockerfile.parent(_final(dockerfile)).name == "runtime", "plain `docker build` must give the runtime image"


@pytest.mark.parametrize("name", COMPONENT_IMAGES)
def test_python_and_cuda_versions_match_the_project(name):
    dockerfile = _parsed(name)
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    base = dockerfile.expand(dockerfile.stages[0], dockerfile.stages[0].base)
    if name == "Dockerfile":
        version = re.match(r"python:(\d+\.\d+\.\d+)", base).group(1)
    else:
        runs = " ".join(dockerfile.stage("python").values("RUN"))
        version = re.search(r"python(3\.\d+)-venv", runs).group(1) + ".0"
        cuda_major = re.match(r"nvidia/cuda:(\d+)\.", base).group(1)
        runtime = _lock_pins(ROOT / "requirements.lock")["nvidia-cuda-runtime"]
        assert runtime.split(".")[0] == cuda_major, f"base CUDA {cuda_major} vs the lock's runtime {runtime}"
    assert version in requires, f"{name}: Python {version} outside {requires}"


def test_locks_pin_exactly_and_match_the_manifests():
    project = _lock_pins(ROOT / "requirements.lock")
    assert "torch" in project, "torch must come from requirements.lock"
    server = _lock_pins(DOCKER / "mlflow-server.lock")
    assert {"mlflow", "flask-wtf", "psycopg2-binary", "boto3"} <= set(server)
    # The MLflow server image tag in the manifests names the MLflow version it contains.
    mlflow = yaml.safe_load_all((K8S / "base" / "mlflow.yaml").read_text())
    deployment = next(d for d in mlflow if d["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f":{server['mlflow']}"), f"{image} vs mlflow=={server['mlflow']}"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_copied_sources_exist_and_are_in_the_build_context(name):
    rules = df.dockerignore_rules(ROOT / ".dockerignore")
    dockerfile = _parsed(name)
    for stage in dockerfile.stages:
        for copy in stage.values("COPY"):
            args = [a for a in shlex.split(copy) if not a.startswith("--")]
            if copy.startswith("--from") or "--from=" in copy:
                continue
            for source in args[:-1]:
                if source == ".":
                    continue
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
                assert not df.is_ignored(rules, source), f"{name}: COPY {source} is excluded by .dockerignore"


def test_dockerignore_keeps_sources_and_tests_out_data_and_secrets():
    rules = df.dockerignore_rules(ROOT / ".dockerignore")
    excluded = [
        ".git/HEAD",
        ".venv/bin/python",
        "data/raw/x.png",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        ".mypy_cache/3.11/x.json",
        "components/__pycache__/cli.cpython-311.pyc",
        "vilbert_mlops.egg-info/PKG-INFO",
        "infra/k8s/components/secrets/postgres.env",
        "artifacts/x",
    ]
    kept = [
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "model/vilbert.py",
        "components/cli.py",
        "pipelines/__init__.py",
        "infra/docker/mlflow-server.lock",
        "infra/k8s/components/secrets/postgres.env.example",
        "infra/k8s/base/config/settings.properties",
        "tests/conftest.py",
        "tests/data/reference_vilbert/README.txt",
    ]
    assert [p for p in excluded if not df.is_ignored(rules, p)] == []
    assert [p for p in kept if df.is_ignored(rules, p)] == []


def test_dockerignore_matcher_follows_docker_not_git_semantics():
    rules = df.dockerignore_rules_from_text("data\n**/*.tmp\n!keep/**/*.tmp\nbuild/\n")
    assert df.is_ignored(rules, "data/a") and not df.is_ignored(rules, "tests/data/a")
    assert df.is_ignored(rules, "x/y/z.tmp") and not df.is_ignored(rules, "keep/a/b.tmp")
    assert df.is_ignored(rules, "build/lib/x.py")


@pytest.mark.slow
def test_project_builds_from_exactly_what_the_builder_copies(tmp_path):
    """`pip install --no-deps .` in the image sees only the builder's COPYs: they must be enough for a wheel
    with every package and the `vilbert` entry point (a new top-level package must be added to the COPYs)."""
    if not in_git_checkout():
        pytest.skip("needs git and a git checkout to list the source files")
    builder = _parsed("Dockerfile").stage("builder")
    rules = df.dockerignore_rules(ROOT / ".dockerignore")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    context = tmp_path / "context"
    for copy in builder.values("COPY"):
        sources = shlex.split(copy)[:-1]
        for relpath in listed:
            if df.is_ignored(rules, relpath) or not (ROOT / relpath).is_file():
                continue
            if any(relpath == s or relpath.startswith(s.rstrip("/") + "/") for s in sources):
                (context / relpath).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / relpath, context / relpath)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("model", "components", "pipelines"):
        assert f"{package}/__init__.py" in names, f"{package} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vilbert = pipelines.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()
