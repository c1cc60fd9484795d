"""The paper's "pretraining helps" table from evaluation outputs: for every task, (a) ViLBERT pretrained,
(b) ViLBERT without multimodal pretraining (``--init scratch``) and (c) zero-shot retrieval, as the mean and
spread over seeds of each task's headline metric.  Markdown + JSON, and an MLflow run.

It reads only ``metrics.json`` files (DATA_CONTRACTS.md, "Step outputs around the trainer"), so it works the
same on the outputs of ``vilbert experiment``, ``dvc repro`` or a Kubeflow run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import storage
from components.steps.common import StepError, TrackingOptions, write_json

ROWS = (("pretrained", "ViLBERT (pretrained)"), ("scratch", "ViLBERT, no multimodal pretraining"),
        ("zero-shot", "Zero-shot (pretrained alignment head)"),
        ("blind", "Blind baseline (no image; RefCOCO+: boxes only)"))  # fmt: skip
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TableConfig:
    """Which evaluation outputs to tabulate and where the table goes."""

    evaluations: tuple[str, ...]
    """Evaluation output folders (each with metrics.json), or folders searched recursively for them."""
    output: str
    """Folder for ``table.md`` and ``table.json``."""
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    """MLflow tracking of the table (a run named ``paper-table`` by default)."""

    def __post_init__(self) -> None:
        if not self.evaluations:
            raise StepError("name at least one evaluation output folder")


@dataclass
class Cell:
    """One (task, row) cell: the headline metric of each seed."""

    metric: str
    values: dict[int, float] = field(default_factory=dict)
    chance: float | None = None
    """The headline metric of a uniformly random choice (``metrics.json``'s ``metrics.chance``), when reported."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mean": self.mean, "std": self.std, "n": len(self.values),
                "seeds": sorted(self.values), "values": [self.values[s] for s in sorted(self.values)],
                "chance": self.chance}  # fmt: skip


def pooled_std(a: Cell, b: Cell) -> float | None:
    """The pooled sample standard deviation of two cells' seeds; None when either has fewer than 2 seeds."""
    na, nb = len(a.values), len(b.values)
    if na < 2 or nb < 2:
        return None
    return math.sqrt(((na - 1) * a.std**2 + (nb - 1) * b.std**2) / (na + nb - 2))


def significant(a: Cell, b: Cell) -> bool:
    """Whether (a) - (b) exceeds twice the pooled standard deviation (needs 2+ seeds in both cells)."""
    pooled = pooled_std(a, b)
    return pooled is not None and a.mean - b.mean > 2 * pooled


def find_metrics(paths: tuple[str, ...]) -> list[Path]:
    """Every metrics.json named directly or found below the given folders (sorted, no duplicates)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name == METRICS_FILE:
            found.add(p.resolve())
        elif (p / METRICS_FILE).exists():
            found.add((p / METRICS_FILE).resolve())
        elif p.is_dir():
            found.update(q.resolve() for q in p.rglob(METRICS_FILE))
        else:
            raise StepError(f"{p} is neither an evaluation output folder nor a metrics.json")
    if not found:
        raise StepError(f"no {METRICS_FILE} under {', '.join(paths)}: run `vilbert evaluate` first")
    return sorted(found)


def collect(files: list[Path]) -> dict[tuple[str, str], Cell]:
    """Cells keyed by (task, row); a (task, row, seed) met twice is an error (ambiguous table)."""
    cells: dict[tuple[str, str], Cell] = {}
    origin: dict[tuple[str, str, int], Path] = {}
    for path in files:
        m = json.loads(path.read_text())
        missing = [k for k in ("task", "metric", "value", "init", "seed") if k not in m]
        if missing:
            raise StepError(f"{path} lacks {missing}: not an evaluate metrics.json")
        row = "zero-shot" if m.get("zero_shot") else "blind" if m.get("blind") else m["init"]
        if row not in dict(ROWS):
            raise StepError(f"{path}: init {m['init']!r} is neither 'pretrained' nor 'scratch'")
        key = (m["task"], row, int(m["seed"]))
        if key in origin:
            raise StepError(f"two evaluations of {key[0]} / {key[1]} / seed {key[2]}: {origin[key]} and {path}")
        origin[key] = path
        cell = cells.setdefault((m["task"], row), Cell(metric=m["metric"]))
        if cell.metric != m["metric"]:
            raise StepError(f"{path} reports {m['metric']} where others report {cell.metric} for {m['task']}")
        value = float(m["value"])
        if not math.isfinite(value):
            raise StepError(f"{path}: the metric value is {value}")
        cell.values[int(m["seed"])] = value
        chance = (m.get("metrics") or {}).get("chance")
        if isinstance(chance, int | float) and math.isfinite(chance):
            cell.chance = float(chance)
    return cells


def render_markdown(cells: dict[tuple[str, str], Cell]) -> str:
    """The table: tasks as columns (headline metric, mean ± sample std over seeds), rows (a), (b), (c), gain."""
    from components.data.tasks import TASK_NAMES, TASKS  # the registry's order and display names

    tasks = [t for t in TASK_NAMES if any(k[0] == t for k in cells)] + sorted({k[0] for k in cells} - set(TASK_NAMES))
    header = "| | " + " | ".join(f"{TASKS[t].title if t in TASKS else t} ({_metric_of(cells, t)})" for t in tasks)
    header += " |"
    lines = [header, "|---|" + "---:|" * len(tasks)]

    def fmt(cell: Cell | None) -> str:
        if cell is None:
            return "—"
        spread = f" ± {cell.std:.1f}" if len(cell.values) > 1 else ""
        return f"{cell.mean:.1f}{spread}"

    has_blind = any(row == "blind" for _, row in cells)
    for i, (row, title) in enumerate(ROWS):
        if row == "blind" and not has_blind:
            continue
        lines.append(f"| ({'abcd'[i]}) {title} | " + " | ".join(fmt(cells.get((t, row))) for t in tasks) + " |")
    gains = []
    for t in tasks:
        a, b = cells.get((t, "pretrained")), cells.get((t, "scratch"))
        gains.append(f"{a.mean - b.mean:+.1f}{' *' if significant(a, b) else ''}" if a and b else "—")
    lines.append("| (a) − (b): gain from pretraining | " + " | ".join(gains) + " |")
    if has_blind:
        margins = [f"{a.mean - d.mean:+.1f}" if (a := cells.get((t, "pretrained"))) and (d := cells.get((t, "blind")))
                   else "—" for t in tasks]  # fmt: skip
        lines.append("| (a) − (d): what the image adds | " + " | ".join(margins) + " |")
    chances = [next((c.chance for (name, _), c in cells.items() if name == t and c.chance is not None), None)
               for t in tasks]  # fmt: skip
    if any(c is not None for c in chances):
        lines.append("| chance (uniformly random choice) | " + " | ".join("—" if c is None else f"{c:.1f}"
                                                                          for c in chances) + " |")  # fmt: skip
    seeds = sorted({s for c in cells.values() for s in c.values})
    lines += ["", f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} "
              f"(n per cell: {', '.join(sorted({str(len(c.values)) for c in cells.values()}))}); "
              "metrics in percent on each task's test split; * marks a gain larger than twice the pooled "
              "standard deviation of (a) and (b) (2+ seeds each)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _metric_of(cells: dict[tuple[str, str], Cell], task: str) -> str:
    """The task's headline metric name (the fine-tuned rows' when there are any)."""
    named = [c.metric for (t, row), c in cells.items() if t == task]
    tuned = [c.metric for (t, row), c in cells.items() if t == task and row != "zero-shot"]
    return (tuned or named)[0]


@dataclass
class TableResult:
    markdown: str
    cells: dict[str, dict[str, Any]]
    gains: dict[str, float]
    output: Path
    tracking_run_id: str | None


def run_table(config: TableConfig) -> TableResult:
    """Collect, render, write ``table.md`` / ``table.json`` and record them in MLflow."""
    from components.tracking import Tracker, TrackingConfig

    files = find_metrics(config.evaluations)
    cells = collect(files)
    markdown = render_markdown(cells)
    gains = {
        t: cells[(t, "pretrained")].mean - cells[(t, "scratch")].mean
        for t in {k[0] for k in cells}
        if (t, "pretrained") in cells and (t, "scratch") in cells
    }
    out = Path(config.output)
    data: dict[str, Any] = {
        "cells": {f"{t}/{row}": c.to_dict() for (t, row), c in sorted(cells.items())},
        "gains": gains,
        "sources": [str(f) for f in files],
    }
    write_json(out / "table.json", data)
    storage.atomic_write_local(out / "table.md", lambda f: f.write(markdown.encode()))
    tracking = TrackingConfig(
        experiment=config.tracking.experiment,
        run_name=config.tracking.run_name or "paper-table",
        output_dir=out,
        tracking_uri=config.tracking.tracking_uri,
        tags={"step": "table", **config.tracking.tags},
        enabled=config.tracking.enabled,
    )
    with Tracker(tracking) as tracker:
        flat = {}
        for (t, row), c in cells.items():
            flat[f"{t}.{row}.mean"] = c.mean
            flat[f"{t}.{row}.std"] = c.std
        flat.update({f"{t}.gain": g for t, g in gains.items()})
        tracker.log_metrics(flat)
        tracker.log_artifact(out / "table.md")
        tracker.log_artifact(out / "table.json")
        run_id = tracker.run_id
    return TableResult(markdown, data["cells"], gains, out, run_id)
