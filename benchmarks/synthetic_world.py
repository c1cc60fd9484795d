"""Generation speed of the synthetic world, written to the ``synthetic`` section of ``benchmarks/RESULTS.md``.

Measures (1) the per-image cost of each stage in one process (scene sampling, language items, rendering
and PNG encoding), and (2) the whole default source end to end: ``images()`` (one pass that also builds
every image's ground truth and language items), ``captions()`` and ``native_files()`` (all task files), with
1 and 2 worker processes.  Wall time and CPU time (this process plus its reaped workers) are both reported,
with the load average, because the benchmark machine is shared.

    .venv/bin/python benchmarks/synthetic_world.py --uri "synthetic://shapes?seed=0&n=3000&size=96" --workers 1 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

from _results import update_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from components.sources.synthetic import SyntheticConfig, SyntheticSource, generate_scene
from components.sources.synthetic_tasks import image_tasks
from components.sources.synthetic_world import render_png

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- synthetic:start -->", "<!-- synthetic:end -->"


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stage_costs(config: SyntheticConfig, count: int) -> dict[str, float]:
    """CPU milliseconds per image of each stage, in this process, over the first ``count`` images."""
    started = time.process_time()
    scenes = [generate_scene(config, i) for i in range(count)]
    scene_ms = (time.process_time() - started) / count * 1e3
    started = time.process_time()
    for scene in scenes:
        image_tasks(config, scene)
    tasks_ms = (time.process_time() - started) / count * 1e3
    started = time.process_time()
    sizes = [len(render_png(scene, config.seed)) for scene in scenes]
    render_ms = (time.process_time() - started) / count * 1e3
    return {"scene": scene_ms, "tasks": tasks_ms, "render": render_ms, "png_kb": sum(sizes) / len(sizes) / 1024}


def end_to_end(uri: str, workers: int) -> dict[str, float]:
    """Wall and CPU seconds of the whole source (images, captions, every native file) with ``workers``."""
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), cpu_seconds()
    source = SyntheticSource(uri, workers=workers)
    image_count = sum(1 for _ in source.images())
    images_s = time.perf_counter() - wall
    caption_count = sum(1 for _ in source.captions())
    files = source.native_files().files
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {
        "workers": workers,
        "images": image_count,
        "captions": caption_count,
        "files_mb": sum(len(v) for v in files.values()) / 1e6,
        "images_wall": images_s,
        "wall": wall,
        "cpu": cpu,
        "images_per_s": image_count / wall,
        "load": (load_before + os.getloadavg()[0]) / 2,
    }


def render(uri: str, stages: dict[str, float], runs: list[dict[str, float]], command: str, count: int) -> str:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_image = stages["scene"] + stages["tasks"] + stages["render"]
    lines = [
        START,
        "## Synthetic world: generation speed",
        "",
        f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; machine: `nproc` = {nproc}, "
        f"Python {platform.python_version()}, shared with other jobs (load average during each run below)",
        f"- Command: `{command}`",
        f"- Source: `{uri}`",
        "",
        f"Per image, one process, CPU time over the first {count} images: scene sampling and ground truth "
        f"{stages['scene']:.2f} ms, captions + task items {stages['tasks']:.2f} ms, rendering + PNG encoding "
        f"{stages['render']:.2f} ms (PNG {stages['png_kb']:.1f} KiB); total {per_image:.2f} ms = "
        f"{1e3 / per_image:.0f} images/s per core.",
        "",
        "End to end (`images()` + `captions()` + `native_files()`; the image pass also builds the ground truth "
        "and language items, so the other two reuse it). CPU = this process + its worker processes. A load "
        "average above 2 means other jobs held the cores: two workers can only gain when a core is free, and "
        "with one worker on an idle core the wall time is about the CPU time.",
        "",
        "| workers | images | captions | files MB | images() s | total wall s | total CPU s | images/s (wall) "
        "| load avg | goal: < 60 s on 2 cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        verdict = "met" if run["wall"] < 60 else "NOT met"
        lines.append(
            f"| {run['workers']} | {run['images']} | {run['captions']} | {run['files_mb']:.1f} | "
            f"{run['images_wall']:.1f} | {run['wall']:.1f} | {run['cpu']:.1f} | {run['images_per_s']:.0f} | "
            f"{run['load']:.1f} | {verdict} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="synthetic://shapes?seed=0&n=3000&size=96", help="source to generate")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--stage-images", type=int, default=300, help="images for the per-stage costs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="results file")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    args = parser.parse_args()
    config = SyntheticConfig.from_uri(args.uri)
    stages = stage_costs(config, min(args.stage_images, config.total_images))
    runs = []
    for workers in args.workers:
        runs.append(end_to_end(args.uri, workers))
        print(runs[-1], file=sys.stderr)
    command = "python benchmarks/synthetic_world.py " + shlex.join(sys.argv[1:])
    section = render(args.uri, stages, runs, command, min(args.stage_images, config.total_images))
    print(section)
    if not args.no_write:
        update_section(args.results, section, "synthetic")


if __name__ == "__main__":
    main()
