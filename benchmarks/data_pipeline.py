"""Data-pipeline throughput (items the trainer gets per second) and the retrieval hard-negative build time,
into the ``data_pipeline`` section of ``benchmarks/RESULTS.md``.

Builds a synthetic world (``run_ingest``; captions from ``captions.parquet`` directly, no validation), a feature
store at the paper's sizes (36 regions, D = 2048, C = 1601, random values), and uses the bundled MiniLM
WordPiece tokenizer (bert-base-uncased vocabulary) with the ``paper-base`` config.  Measures, per dataset, one
pass of ``dataset[i]`` + ``Collator`` in the main process (CPU microseconds per item), and for pretraining a
DataLoader epoch with workers.  Then ``word_neighbours`` on Flickr30k-sized caption texts (29,000 images).

    .venv/bin/python benchmarks/data_pipeline.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from _results import update_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from torch.utils.data import DataLoader

from components.data.collate import Collator
from components.data.pretraining import PretrainingDataset
from components.data.regions import RegionSource
from components.data.sampler import ResumableDistributedSampler
from components.data.tasks import (
    AnswerVocab,
    RefCOCODataset,
    RetrievalTrainDataset,
    TaskFiles,
    VCRDataset,
    VQADataset,
)
from components.data.tasks.retrieval import word_neighbours
from components.features import FeatureSpec, FeatureStoreWriter, RegionFeatures
from model import preset
from model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NAME = "data_pipeline"


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def write_store(root: Path, store: Path, boxes: int, d: int, c: int) -> None:
    spec = FeatureSpec("demo", None, feature_size=d, num_classes=c, min_boxes=1, max_boxes=boxes)
    with FeatureStoreWriter(store, spec) as writer:
        for i, row in enumerate(pq.read_table(root / "manifest.parquet").to_pylist()):
            rng = np.random.default_rng(i)
            w, h = row["width"], row["height"]
            xy = rng.random((boxes, 2)) * [w / 2, h / 2]
            wh = rng.random((boxes, 2)) * [w / 2, h / 2]
            logits = rng.standard_normal((boxes, c))
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            writer.add(
                RegionFeatures(
                    row["image_id"],
                    np.concatenate([xy, xy + wh], 1).astype(np.float32),
                    np.maximum(rng.standard_normal((boxes, d)), 0).astype(np.float32),
                    probs.astype(np.float32),
                    w,
                    h,
                )
            )


def per_item(dataset: Any, collate: Collator, batch: int) -> dict[str, float]:
    """One pass over the dataset in this process: CPU and wall microseconds per item (items + collation)."""
    n = len(dataset)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for start in range(0, n, batch):
        collate([dataset[i] for i in range(start, min(start + batch, n))])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"items": n, "cpu_us": 1e6 * cpu / n, "wall_us": 1e6 * wall / n, "items_per_s": n / wall}


def loader_rate(dataset: Any, collate: Collator, batch: int, workers: int, epochs: int) -> float:
    """Items per second through a DataLoader with the resumable sampler (timed from the first batch)."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=1, rank=0)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)  # fmt: skip
    items, started = 0, None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for b in loader:
            if started is None:
                started = time.perf_counter()
                continue
            items += b["input_ids"].shape[0]
    assert started is not None
    return items / (time.perf_counter() - started)


def flickr_like_texts(n: int, seed: int = 0) -> list[str]:
    """Five 12-word sentences per image over a Zipf-distributed 18,000-word vocabulary (Flickr30k-like sizes)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 18_001)
    words = rng.choice(18_000, size=(n, 60), p=p / p.sum())
    return [" ".join(f"w{w}" for w in row) for row in words]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="synthetic world size n")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--neighbours", type=int, default=29_000, help="texts for the hard-negative build")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    a = p.parse_args(argv)
    from components.steps.ingest import IngestConfig, run_ingest

    config = preset("paper-base")
    started, load0 = time.monotonic(), os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="databench-"))
    r: dict[str, Any] = {}
    try:
        root = workdir / "data"
        run_ingest(IngestConfig(source=f"synthetic://shapes?seed=0&n={a.images}&size=64", output=str(root),
                                progress=False, workers=2))  # fmt: skip
        write_store(root, workdir / "store", 36, config.vision.feature_size, config.vision.target_size)
        regions, tokenizer = RegionSource(workdir / "store", config), load_tokenizer()
        files = TaskFiles(root)
        collate = Collator(pad_token_id=tokenizer.pad_token_id)
        vocab = AnswerVocab.from_task_files(files, min_count=1)
        datasets = {
            "pretraining": PretrainingDataset(root / "captions.parquet", regions, tokenizer),
            "vqa": VQADataset(files, regions, tokenizer, vocab),
            "vcr (4 pairs / item)": VCRDataset(files, regions, tokenizer),
            "refcoco+": RefCOCODataset(files, regions, tokenizer),
            "retrieval (4 pairs / item)": RetrievalTrainDataset(files, regions, tokenizer),
        }
        torch.set_num_threads(1)
        r["per_item"] = {}
        for name, ds in datasets.items():
            r["per_item"][name] = per_item(ds, collate, a.batch_size)
            log(f"{name}: {r['per_item'][name]}")
        r["loader"] = loader_rate(datasets["pretraining"], collate, a.batch_size, a.workers, epochs=3)
        log(f"pretraining loader, {a.workers} workers: {r['loader']:.0f} items/s")
        texts = flickr_like_texts(a.neighbours)
        torch.set_num_threads(2)
        t0 = time.perf_counter()
        word_neighbours(texts, 100)
        r["neighbours_s"] = time.perf_counter() - t0
        log(f"word_neighbours({a.neighbours}): {r['neighbours_s']:.1f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    r["load"] = (load0, os.getloadavg()[0])
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    section = render(a, r, (time.monotonic() - started) / 60, command)
    update_section(a.output, section, NAME)
    print(section)


def render(a: argparse.Namespace, r: dict[str, Any], minutes: float, command: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(
        f"| {name} | {v['items']} | {v['cpu_us']:.0f} | {v['items_per_s']:.0f} |" for name, v in r["per_item"].items()
    )
    return f"""<!-- {NAME}:start -->
## Data pipeline: items per second into the trainer, and the retrieval hard-negative build

- Date: {now}; total benchmark time {minutes:.1f} min
- Machine: `nproc` = {os.cpu_count()}, Python {platform.python_version()}, torch {torch.__version__}; 1-minute load \
average before / after: {r["load"][0]:.1f} / {r["load"][1]:.1f} (shared machine: wall rates are noisy)
- Command: `{command}`
- Data: synthetic world n = {a.images} (64 px), feature store at the paper's sizes (36 regions + the whole-image \
token, D = 2048, C = 1601, random values), bundled MiniLM WordPiece tokenizer, `paper-base` config; captions \
read from `captions.parquet` (no validation run), task rows from the native task files.
- Per item = one pass of `dataset[i]` and `Collator` (dynamic padding) over the whole dataset in one process, \
1 torch thread: CPU microseconds per item (steadier than wall time here) and items/s.

| dataset | items | CPU us / item | items/s (1 process) |
|---|---|---|---|
{rows}

- Pretraining through a DataLoader (`ResumableDistributedSampler`, batch {a.batch_size}, {a.workers} persistent \
workers, 3 epochs, timed from the first batch): **{r["loader"]:.0f} items/s**.
- `word_neighbours` (TF-IDF cosine, 100 nearest per image) on {a.neighbours} Flickr30k-sized texts (60 words per \
image, Zipf over 18,000 words), 2 torch threads: **{r["neighbours_s"]:.1f} s** (once per `RetrievalTrainDataset`).

<!-- {NAME}:end -->
"""


if __name__ == "__main__":
    main()
