"""The task registry (``components/data/tasks``) is the only place that knows tasks by name.

Every per-task behaviour is a field of the task's ``TaskSpec``; the source tree outside the registry package has no
``task == "vqa"``-style dispatch and no table keyed by task names, and every task list is the registry's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from components.data.tasks import TASK_NAMES, TASKS, ZERO_SHOT_TASK

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = ROOT / "components" / "data" / "tasks"
SCANNED = ("components", "pipelines", "model")
_QUOTED = r"[\"'][^\"']*[\"']"
#: A task variable or attribute compared with a string literal (either side), or tested against a literal tuple.
DISPATCH = re.compile(
    rf"\btask\w*\s*(==|!=)\s*{_QUOTED}|{_QUOTED}\s*(==|!=)\s*[\w.]*\btask\b|\btask\w*\s+(not\s+)?in\s+[(\[{{]\s*{_QUOTED}"
)
#: A dict literal entry keyed by a task name (a per-task table outside the registry).
KEYED = re.compile(r"[\"'](" + "|".join(re.escape(name) for name in TASKS) + r")[\"']\s*:")


def _sources() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    return [p for p in files if REGISTRY not in p.parents]


def test_patterns_catch_dispatch():
    for line in ('if task == "vqa":', "elif config.task != 'vcr':", 'if "retrieval" == spec.task:',
                 'if task in ("vqa", "vcr"):', "if predictions.task not in ['refcoco+']:"):  # fmt: skip
        assert DISPATCH.search(line), line
    for line in ("if predictions.task != task:", "if task in TASKS:", "spec = TASKS[task]"):
        assert not DISPATCH.search(line), line
    assert KEYED.search('{"vqa": 23, "vcr": 40}') and not KEYED.search('TASKS["vqa"]')


def test_no_task_dispatch_outside_the_registry():
    assert _sources(), "nothing scanned: wrong root"
    found = []
    for path in _sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if DISPATCH.search(line) or KEYED.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "per-task dispatch outside components/data/tasks (make it a TaskSpec field):\n" + "\n".join(found)


def test_one_task_list():
    from components.evaluation import HEADLINE
    from components.serving.predictor import OUTPUT_COLUMNS
    from components.steps.register import MODEL_NAMES
    from pipelines.full import PipelineParams

    assert TASK_NAMES == tuple(TASKS) == ("vqa", "vcr", "refcoco+", "retrieval")
    assert all(name == spec.name for name, spec in TASKS.items())
    compiled = next(yaml.safe_load_all((ROOT / "pipelines" / "full.yaml").read_text()))
    assert compiled["root"]["inputDefinitions"]["parameters"]["tasks"]["defaultValue"] == list(TASK_NAMES)
    for derived in (HEADLINE, MODEL_NAMES, OUTPUT_COLUMNS):
        assert tuple(derived) == TASK_NAMES
    # params.yaml is user configuration: it may choose tasks, but only registered ones
    configured = yaml.safe_load((ROOT / "params.yaml").read_text())["matrix"]["tasks"]
    assert configured and set(configured) <= set(TASK_NAMES)
    assert PipelineParams().tasks == configured  # the Kubeflow default is params.yaml's
    assert TASKS[ZERO_SHOT_TASK].zero_shot and TASKS[ZERO_SHOT_TASK].gallery


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_defines_what_the_steps_need(name):
    spec = TASKS[name]
    assert spec.heads and spec.metric and spec.title and spec.model_name.startswith("vilbert-")
    assert spec.files and spec.text_length >= 4 and spec.blind in ("image", "position")
    assert spec.serving.columns and spec.serving.example_text.strip()
    assert len(set(spec.serving.columns)) == len(spec.serving.columns)
    assert all(kind.removesuffix("[]") in ("string", "double", "long") for _, kind in spec.serving.outputs)


def test_table_columns_follow_the_registry():
    from components.steps.table import Cell, render_markdown

    cells = {(t, "pretrained"): Cell("m", {0: 1.0}) for t in reversed(TASK_NAMES)}
    header = render_markdown(cells).splitlines()[0]
    positions = [header.index(TASKS[t].title) for t in TASK_NAMES]
    assert positions == sorted(positions)
