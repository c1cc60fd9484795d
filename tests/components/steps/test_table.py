"""The results table: mean ± sd over seeds, chance per task, and a gain marked only when it is significant."""

from __future__ import annotations

import json

import pytest

from components.steps.table import Cell, collect, find_metrics, pooled_std, render_markdown, significant


def _write(root, task, init, seed, value, chance, metric="m"):
    folder = root / f"{task}-{init}-s{seed}"
    folder.mkdir(parents=True)
    m = {"task": task, "metric": metric, "value": value, "init": init, "seed": seed, "zero_shot": False,
         "metrics": {metric: value, "chance": chance}}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(m))


def test_pooled_std_and_significance_follow_their_definitions() -> None:
    a = Cell("m", {0: 50.0, 1: 52.0, 2: 54.0})  # sd 2
    b = Cell("m", {0: 40.0, 1: 44.0, 2: 48.0})  # sd 4
    assert pooled_std(a, b) == pytest.approx((10.0) ** 0.5)  # sqrt((2 * 4 + 2 * 16) / 4)
    assert significant(a, b)  # 8 > 2 * 3.16
    close = Cell("m", {0: 45.0, 1: 49.0, 2: 53.0})
    assert not significant(close, b)  # 5 < 2 * 4
    assert not significant(a, Cell("m", {0: 10.0}))  # one seed: no claim
    assert not significant(b, a)  # a loss is never a significant gain


def test_table_shows_chance_and_marks_only_significant_gains(tmp_path) -> None:
    for seed, (p, s) in enumerate([(60, 30), (62, 31), (61, 29)]):
        _write(tmp_path, "vcr", "pretrained", seed, p, 25.0)
        _write(tmp_path, "vcr", "scratch", seed, s, 25.0)
    for seed, (p, s) in enumerate([(40, 38), (30, 41), (50, 39)]):
        _write(tmp_path, "vqa", "pretrained", seed, p, 1.5)
        _write(tmp_path, "vqa", "scratch", seed, s, 1.5)
    cells = collect(find_metrics((str(tmp_path),)))
    assert cells[("vcr", "pretrained")].chance == 25.0
    table = render_markdown(cells)
    gain = next(line for line in table.splitlines() if line.startswith("| (a) − (b)"))
    assert gain.split("|")[1:3] == [" (a) − (b): gain from pretraining ", " +0.7 "]  # vqa: noise, no mark
    assert "+31.0 *" in gain  # vcr: far beyond the seeds' spread
    chance = next(line for line in table.splitlines() if line.startswith("| chance"))
    assert chance.split("|")[2:4] == [" 1.5 ", " 25.0 "]


def test_blind_baseline_is_its_own_row_with_the_margin_over_it(tmp_path) -> None:
    """metrics.json with ``blind: true`` (a scratch model that saw no image) is row (d), never mixed into (b)."""
    for seed in range(2):
        _write(tmp_path, "vqa", "pretrained", seed, 60.0 + seed, 3.8)
        _write(tmp_path, "vqa", "scratch", seed, 50.0 + seed, 3.8)
        _write(tmp_path / "blind", "vqa", "scratch", seed, 40.0 + seed, 3.8)
    for path in (tmp_path / "blind").rglob("metrics.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "blind": True}))
    cells = collect(find_metrics((str(tmp_path),)))
    assert cells[("vqa", "scratch")].mean == 50.5 and cells[("vqa", "blind")].mean == 40.5
    table = render_markdown(cells)
    blind = next(line for line in table.splitlines() if line.startswith("| (d)"))
    assert blind.split("|")[2].strip().startswith("40.5")
    margin = next(line for line in table.splitlines() if line.startswith("| (a) − (d)"))
    assert margin.split("|")[2].strip() == "+20.0"
    without = render_markdown({k: c for k, c in cells.items() if k[1] != "blind"})
    assert "(d)" not in without and "(a) − (d)" not in without
