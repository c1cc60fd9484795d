"""Dependency direction (ARCHITECTURE.md): pipelines -> components -> model, nothing pointing back up.

Every import statement counts, the ones inside functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_imported(path: Path) -> set[str]:
    """Every module a file imports (absolute imports, the ones inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imports_of(folder: str) -> dict[str, set[str]]:
    """``{file relative to the root: the top two levels of every module it imports}`` for a package folder."""
    return {
        str(path.relative_to(ROOT)): {".".join(name.split(".")[:2]) for name in modules_imported(path)}
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path} imports {name}"
        for path, names in imports_of(folder).items()
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_the_scan_sees_imports():
    assert "components.data" in imports_of("components")["components/data/tasks/vqa.py"]
    assert offenders("pipelines", ("components",)), "pipelines must import components: the scan is broken"


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("model", ("components", "pipelines", "benchmarks", "mlflow", "boto3", "kfp", "dvc", "great_expectations")),
        ("components", ("pipelines", "benchmarks", "kfp")),
        # the trainer knows nothing of Kubernetes or of the benchmarks
        ("components/training", ("components.kube", "components.bench")),
    ],
)
def test_nothing_points_back_up(folder, forbidden):
    assert not offenders(folder, forbidden)


#: The pipeline's steps, one module each in components/steps/ (README, "Layout").
STEPS = ("ingest", "validate", "features", "pretrain", "finetune", "evaluate", "table", "register")
#: The top-level modules of components/: the infrastructure every layer shares, and the command line.
INFRASTRUCTURE = ("cli", "config", "storage", "tracking")


def test_components_top_level_is_the_steps_the_libraries_and_the_shared_infrastructure():
    top = ROOT / "components"
    assert {p.stem for p in top.glob("*.py")} == {"__init__", *INFRASTRUCTURE}
    packages = {p.name for p in top.iterdir() if (p / "__init__.py").is_file()}
    assert "steps" in packages and {"registry", "serving", "training", "features"} <= packages


def test_the_steps_package_holds_the_steps_and_what_they_share():
    assert {p.stem for p in (ROOT / "components" / "steps").glob("*.py")} == {"__init__", "common", *STEPS}
    assert not [p for p in (ROOT / "components" / "steps").iterdir() if p.is_dir() and p.name != "__pycache__"]


@pytest.mark.parametrize("step", STEPS)
def test_every_step_has_its_tests_beside_the_others(step):
    """tests/components/steps/ mirrors components/steps/: each step is imported by a test there."""
    tests = sorted((ROOT / "tests" / "components" / "steps").glob("test_*.py"))
    assert any(f"components.steps.{step}" in modules_imported(path) for path in tests), step


def test_the_console_script_has_the_pipeline_commands():
    import tomllib

    import typer.main

    from pipelines.cli import app

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vilbert"] == "pipelines.cli:app"
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {"pipeline", "pretrain", "finetune", "evaluate", "model"} <= set(commands)
    assert {"run", "compile"} <= set(commands["pipeline"].commands)
