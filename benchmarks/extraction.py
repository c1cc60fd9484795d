"""Feature-extraction speed per backend on this CPU (and the demo detector's quality), into ``benchmarks/RESULTS.md``.

Measures, then replaces the section ``extraction`` of the results file:

1. the whole features step with the ``demo`` backend on an ingested synthetic world (training the detector,
   its held-out box recall, then extraction), with one process and with two;
2. each backend's extractor alone on decoded images in memory (warm, after one untimed batch): ``demo`` on
   the world's 96 px images, and ``detector`` (Faster R-CNN R50-FPN, RANDOM weights: speed only, never
   accuracy) on 640 x 480 images resized to bottom-up-attention's test scale (600 / 1000), 300 proposals,
   with Visual Genome's 1601 classes so the per-class NMS costs what it would.

    .venv/bin/python benchmarks/extraction.py            # 600 images, 2 threads
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import update_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from components.features.backends import BACKENDS, BoxLimits, DemoOptions, DetectorOptions, decode_rgb
from components.features.backends.base import PrepareContext
from components.sources.synthetic import SyntheticConfig, generate_image
from components.steps.features import FeaturesConfig, run_features
from components.steps.ingest import IngestConfig, run_ingest

ROOT = Path(__file__).resolve().parents[1]
NAME = "extraction"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}"


def step(dataset: str, out: Path, workers: int, threads: int, model_dir: str | None) -> dict[str, Any]:
    """The whole features step with the demo backend; returns its result as a dict plus the load average."""
    before = load()
    cfg = FeaturesConfig(
        dataset=dataset, output=str(out), demo=DemoOptions(model_dir=model_dir), num_workers=workers,
        threads=threads, progress=False,
    )  # fmt: skip
    result = asdict(run_features(cfg, log=lambda m: print(f"  {m}", file=sys.stderr)))
    return {**result, "load_before": before, "load_after": load(), "workers": workers, "threads": threads}


def time_extractor(name: str, prepared, limits: BoxLimits, images: list[np.ndarray], batch: int) -> dict[str, Any]:
    """images/s of one backend's ``extract`` on images already decoded (one untimed warm-up batch)."""
    threads = torch.get_num_threads()
    extractor = BACKENDS[name].load(prepared, limits, "cpu")
    extractor.extract(images[:batch])
    before, start, regions = load(), time.perf_counter(), 0
    for k in range(0, len(images), batch):
        regions += sum(len(r.boxes) for r in extractor.extract(images[k : k + batch]))
    seconds = time.perf_counter() - start
    h, w = images[0].shape[:2]
    return {
        "backend": name, "images": len(images), "input": f"{w} x {h}", "batch": batch, "seconds": seconds,
        "threads": threads,
        "images_per_s": len(images) / seconds, "mean_regions": regions / len(images), "load_before": before,
        "load_after": load(),
    }  # fmt: skip


def random_detector(path: Path, num_classes: int) -> None:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    torch.save(model.state_dict(), path)


def render(res: dict[str, Any], command: str, minutes: float) -> str:
    start, end = f"<!-- {NAME}:start -->", f"<!-- {NAME}:end -->"
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    demo = res["steps"][0]["backend_report"]
    lines = [
        start,
        "## Feature extraction: images/s per backend, and the demo detector's box recall",
        "",
        f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; total {minutes:.1f} min",
        f"- Machine: `nproc` = {nproc}, Python {platform.python_version()}, torch {torch.__version__}; the machine "
        "is shared, so the 1-minute load average before / after each measurement is given (2 = both cores busy).",
        f"- Command: `{command}`",
        "",
        f"Whole step, `demo` backend, synthetic world (`{res['source']}`, {res['steps'][0]['seen']} images, "
        "96 x 96): training the detector on the train split, measuring it on the val split, extracting every "
        "image (K = 10..36 regions).  images/s = extracted images / extraction time (the slowest process; "
        "process start-up excluded); step s = the whole call, training included.",
        "",
        "| processes x threads | extracted | images/s | step s | train s | load before / after |",
        "|---|---|---|---|---|---|",
    ]
    for s in res["steps"]:
        train = s["backend_report"].get("train_seconds", "-") if s is res["steps"][0] else "reused"
        lines.append(
            f"| {s['workers']} x {s['threads']} | {s['extracted']} | {s['images_per_s']:.1f} | {s['seconds']:.1f} "
            f"| {train} | {s['load_before']} / {s['load_after']} |"
        )
    lines += [
        "",
        f"Demo detector on {demo['held_out_images']} held-out images ({demo['mean_objects']:.2f} objects each), "
        f"trained on {demo['train_images']} images for {demo['epochs']} epochs ({demo['steps']} steps); box recall "
        "= share of ground-truth boxes that some box covers with IoU >= 0.5:",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for key, label in (
        ("box_recall_at_0_5", "box recall @0.5, stored regions (10..36 per image)"),
        ("detection_recall_at_0_5", "box recall @0.5, confident detections (score >= 0.2)"),
        ("detection_precision_at_0_5", "precision @0.5 of the confident detections"),
        ("proposal_recall_at_0_5", "box recall @0.5 of all colour-segmentation proposals"),
        ("gt_box_class_accuracy", "class accuracy on ground-truth boxes (56 colour x shape classes)"),
        ("region_class_accuracy", "class accuracy of the best-overlapping stored region"),
        ("gt_box_attribute_accuracy", "attribute accuracy on ground-truth boxes (per attribute)"),
        ("mean_detections", "confident detections per image"),
    ):
        lines.append(f"| {label} | {demo[key]:.3f} |")
    lines += [
        "",
        "Extractor alone (decoded images in memory, warm, one process).  `detector` has RANDOM weights: speed "
        "only, never accuracy.",
        "",
        "| backend | input (resized to) | threads | batch | images | images/s | regions/image | load before / after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in res["extractors"]:
        scale = " (600 / 1000, 300 proposals, 1601 classes)" if e["backend"] == "detector" else ""
        lines.append(
            f"| {e['backend']} | {e['input']}{scale} | {e['threads']} | {e['batch']} | {e['images']} "
            f"| {e['images_per_s']:.2f} "
            f"| {e['mean_regions']:.1f} | {e['load_before']} / {e['load_after']} |"
        )
    lines += ["", end]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600, help="base images of the synthetic world")
    p.add_argument("--detector-images", type=int, default=6)
    p.add_argument("--detector-classes", type=int, default=1601)
    p.add_argument("--threads", type=int, default=2, help="detector threads; demo processes in the 2nd step run")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    started = time.monotonic()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-extraction-"))
    source = f"synthetic://shapes?seed=0&n={a.images}&size=96"
    dataset = str(tmp / "dataset")
    run_ingest(IngestConfig(source=source, output=dataset, progress=False))
    print("[extraction] demo step, 1 process", file=sys.stderr)
    steps = [step(dataset, tmp / "store1", 1, 1, None)]
    model_dir = str(tmp / "store1" / "demo_detector")
    print("[extraction] demo step, 2 processes", file=sys.stderr)
    steps.append(step(dataset, tmp / "store2", a.threads, 1, model_dir))

    extractors = []
    config = SyntheticConfig(n=max(a.images, 64), size=96)
    demo_images = [decode_rgb(generate_image(config, i).png) for i in range(64)]
    ctx = PrepareContext(dataset, None, str(tmp / "store1"), tmp, BoxLimits(), log=lambda _m: None)  # type: ignore[arg-type]
    prepared = BACKENDS["demo"](DemoOptions(model_dir=model_dir)).prepare(ctx)
    print("[extraction] demo extractor", file=sys.stderr)
    torch.set_num_threads(1)  # the demo backend's default (DemoBackend.max_threads)
    extractors.append(time_extractor("demo", prepared, BoxLimits(), demo_images, 8))
    torch.set_num_threads(a.threads)
    weights = tmp / "detector.pt"
    random_detector(weights, a.detector_classes)
    big = SyntheticConfig(n=max(a.detector_images, 20), size=640)
    photos = [decode_rgb(generate_image(big, i).png)[:480] for i in range(a.detector_images)]
    prepared = BACKENDS["detector"](DetectorOptions(weights=str(weights))).prepare(ctx)
    print("[extraction] detector extractor", file=sys.stderr)
    extractors.append(time_extractor("detector", prepared, BoxLimits(), photos, 2))

    res = {"source": source, "threads": a.threads, "steps": steps, "extractors": extractors}
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    update_section(a.output, render(res, command, (time.monotonic() - started) / 60), NAME)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
