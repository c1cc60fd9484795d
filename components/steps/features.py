"""The features step: region features for every image of a dataset root, into a feature store.

``run_features(config)`` reads the manifest (local or S3), prepares the backend once (``demo``: trains
the detector and measures its held-out box recall; ``detector``: fetches and hashes the weights), then
extracts in batches, split over ``num_workers`` processes per rank (and over ranks under torchrun:
``RANK`` / ``WORLD_SIZE``).  Every process writes its own store part; the index is merged at the end.

Resumable: images already in the store are skipped (a crash loses at most the unsealed shard of each
part; ``checkpoint_every`` seals shards more often).  Images that cannot be read, decoded or extracted,
or whose regions break the spec, are quarantined with their reason, never a crash; counts reconcile:
``seen = extracted + skipped_existing + quarantined``.  Files written next to the store's own:
``features_report.json`` (counts, speed, the backend's report) and ``quarantine.parquet``.
An ``s3://`` store is staged in a local folder and uploaded (new files only) when done.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.features.backends import BACKENDS, EXTRACTOR_FILE, BoxLimits, DemoOptions, DetectorOptions
from components.features.backends.base import BackendError, PreparedBackend
from components.features.extract_worker import QUARANTINE_COLUMNS, Ranks, Share, ShareResult, extract_share

IMPORT_BACKEND = "import"
REPORT_FILE, QUARANTINE_FILE = "features_report.json", "quarantine.parquet"


@dataclass(frozen=True)
class ImportOptions:
    """The ``import`` backend: existing features files instead of extraction."""

    format: str
    """``tsv``, ``lmdb`` or ``hdf5`` (see components/DATA_CONTRACTS.md)."""
    paths: tuple[str, ...]
    """Files (TSV parts, HDF5 files) or the LMDB folder, local."""
    allow_uniform_class_probs: bool = False
    """Accept files without class probabilities (stores a uniform placeholder, marked in the spec)."""
    feature_size: int = 2048
    """D of the imported features."""
    num_classes: int = 1601
    """C of the imported class distributions."""


@dataclass(frozen=True)
class FeaturesConfig:
    """One run of the features step."""

    dataset: str
    """Dataset root (local or s3://) with manifest.parquet and images/ (and annotations/ for ``demo``)."""
    output: str
    """Feature store root to create or resume (local or s3://)."""
    backend: str = "demo"
    """``demo``, ``detector`` or ``import``."""
    boxes: BoxLimits = field(default_factory=BoxLimits)
    """Regions per image: min / max boxes, confidence and NMS thresholds."""
    splits: tuple[str, ...] = ()
    """Manifest splits to extract (empty: all)."""
    limit: int | None = None
    """Extract at most this many images (the first by image id): smoke runs."""
    batch_size: int = 8
    """Images per backend call."""
    num_workers: int = 1
    """Extraction processes per rank, each writing its own store part (1: in this process)."""
    threads: int | None = None
    """torch threads per extraction process (default: CPU cores / processes on this host, capped by the backend)."""
    read_workers: int = 8
    """Threads per process that read and decode images (I/O bound on S3)."""
    resume: bool = True
    """Skip images already in the store; False refuses a store that already holds images."""
    device: str = "cpu"
    """torch device for training and extraction."""
    seed: int = 0
    """Seed for anything trained (the demo detector)."""
    checkpoint_every: int = 2000
    """Seal the shard after this many images per process, so a crash loses at most that many."""
    shard_bytes: int = 256 * 2**20
    """Shard size of the store writer."""
    max_quarantine_fraction: float = 0.1
    """Fail the step (after writing everything) when more of the images than this are quarantined."""
    work_dir: str | None = None
    """Local scratch folder (staging of an s3:// store, a trained detector before upload); default: a temp dir."""
    progress: bool = True
    """Show progress bars (one per process) on stderr."""
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    """Options of the ``detector`` backend."""
    demo: DemoOptions = field(default_factory=DemoOptions)
    """Options of the ``demo`` backend."""
    imports: ImportOptions | None = None
    """Options of the ``import`` backend (required for it, refused for the others)."""

    def __post_init__(self) -> None:
        problems = [
            (self.backend not in (*BACKENDS, IMPORT_BACKEND), f"backend must be one of {[*BACKENDS, IMPORT_BACKEND]}"),
            ((self.backend == IMPORT_BACKEND) != (self.imports is not None), "imports is needed for, and only for, import"),
            (not self.output.strip(), "output is empty"),
            (self.backend != IMPORT_BACKEND and not self.dataset.strip(), "dataset is empty"),
            (self.limit is not None and self.limit < 1, "limit must be >= 1"),
            (min(self.batch_size, self.num_workers, self.read_workers, self.checkpoint_every) < 1,
             "batch_size, num_workers, read_workers and checkpoint_every must be >= 1"),
            (self.threads is not None and self.threads < 1, "threads must be >= 1"),
            (not 0 <= self.max_quarantine_fraction <= 1, "max_quarantine_fraction must lie in [0, 1]"),
        ]  # fmt: skip
        bad = [message for failed, message in problems if failed]
        if bad:
            raise ValueError("invalid FeaturesConfig: " + "; ".join(bad))


@dataclass
class FeaturesResult:
    """What the step did.  ``seen == extracted + skipped_existing + quarantined``."""

    output: str
    backend: str
    spec: dict[str, Any]
    seen: int = 0
    extracted: int = 0
    skipped_existing: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    stored_total: int = 0
    """Images in the store after the run (all runs)."""
    mean_regions: float | None = None
    """Regions per extracted image, on average."""
    seconds: float = 0.0
    """Whole step, preparation (training) included."""
    extract_seconds: float = 0.0
    """Extraction only (the slowest process)."""
    images_per_s: float | None = None
    """Extracted images per second of extraction (all processes and ranks together)."""
    processes: int = 1
    """Extraction processes over all ranks."""
    backend_report: dict[str, Any] = field(default_factory=dict)
    """The backend's preparation report (``demo``: training, held-out box recall at IoU 0.5)."""
    report_path: str = ""
    quarantine_path: str = ""


class FeaturesFailed(RuntimeError):
    """The step wrote everything but quarantined too many images; ``result`` says what happened."""

    def __init__(self, message: str, result: FeaturesResult) -> None:
        super().__init__(message)
        self.result = result


def run_features(config: FeaturesConfig, log: Callable[[str], None] = print) -> FeaturesResult:
    """Run the features step (see the module docstring); returns the same result on every rank."""
    if config.imports is not None:
        return _run_import(config)
    with Ranks() as ranks:
        return _run_extraction(config, ranks, log if ranks.rank == 0 else (lambda _msg: None))


def _run_extraction(config: FeaturesConfig, ranks: Ranks, log: Callable[[str], None]) -> FeaturesResult:
    from components import storage
    from components.features.backends.base import PrepareContext
    from components.features.spec import FeatureSpec
    from components.features.store import merge_index

    start = time.perf_counter()
    work = Path(config.work_dir or tempfile.mkdtemp(prefix="vilbert-features-"))
    s3 = storage.is_s3(config.output)
    local = work / "store" if s3 else Path(config.output)
    manifest = _read_manifest(config)
    backend = BACKENDS[config.backend](getattr(config, config.backend))  # options live in the field of that name
    ctx = PrepareContext(config.dataset, manifest, config.output, work, config.boxes, config.device, config.seed, log)

    def prepare() -> PreparedBackend:
        if s3:
            _stage_index(config.output, local)
        return backend.prepare(ctx)

    prepared: PreparedBackend = ranks.run_on_zero(prepare)
    b = config.boxes
    spec = FeatureSpec(
        prepared.backend, prepared.weights_sha256, prepared.feature_size, prepared.num_classes, b.min_boxes, b.max_boxes
    )
    todo: list[dict[str, str]] = ranks.run_on_zero(lambda: _todo(config, manifest, local, spec))
    seen = len(_selected(config, manifest))
    processes = ranks.world * config.num_workers
    run_id = ranks.run_on_zero(lambda: time.strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6])
    fair_share = max(1, (os.cpu_count() or 1) // (config.num_workers * ranks.local_world))
    threads = config.threads or min(fair_share, type(backend).max_threads or fair_share)
    shares = [
        Share(
            prepared=prepared,
            spec=spec,
            limits=config.boxes,
            device=config.device,
            dataset=config.dataset,
            store=str(local),
            part=f"x{run_id}_r{ranks.rank}_w{w}",  # new names every run: never reuses an older run's shard files
            rows=todo[ranks.rank * config.num_workers + w :: processes],
            batch_size=config.batch_size,
            threads=threads,
            read_workers=config.read_workers,
            checkpoint_every=config.checkpoint_every,
            shard_bytes=config.shard_bytes,
            progress=config.progress,
            position=ranks.local_rank * config.num_workers + w,
        )
        for w in range(config.num_workers)
    ]
    log(f"features: {seen} images, {seen - len(todo)} already stored, {len(todo)} to extract in {processes} processes")

    def extract() -> list[ShareResult]:
        done = _run_shares(shares)
        if s3:
            storage.sync_up(local, config.output)  # this rank's parts; rank 0 merges them all below
        return done

    parts = [p for rank_parts in ranks.run_everywhere(extract) for p in rank_parts]

    def finish() -> FeaturesResult:
        result = FeaturesResult(config.output, prepared.backend, spec.to_dict(), seen=seen, processes=processes)
        result.backend_report = prepared.report
        _fold(result, parts, seen - len(todo))
        if s3:
            _stage_index(config.output, local)  # shard indexes written by ranks on other hosts
        result.stored_total = merge_index(local)
        result.seconds = time.perf_counter() - start
        _write_outputs(config, local, result, parts, prepared)
        if s3:
            storage.sync_up(local, config.output)
        return result

    result: FeaturesResult = ranks.run_on_zero(finish)
    _check_quarantine(config, result)
    return result


def _read_manifest(config: FeaturesConfig):
    import io

    import pandas as pd

    from components import storage

    data = storage.read_bytes(storage.join(config.dataset, "manifest.parquet"))
    return pd.read_parquet(io.BytesIO(data))


def _selected(config: FeaturesConfig, manifest) -> list[dict[str, str]]:
    """The manifest rows this run covers, by image id, as plain dicts (picklable, small)."""
    rows = manifest if not config.splits else manifest[manifest["split"].isin(config.splits)]
    rows = rows.sort_values("image_id", kind="stable")
    if config.limit is not None:
        rows = rows.head(config.limit)
    return [{"image_id": str(r.image_id), "path": str(r.path), "split": str(r.split)} for r in rows.itertuples()]


def _todo(config: FeaturesConfig, manifest, local: Path, spec) -> list[dict[str, str]]:
    """Selected rows not in the store yet; refuses a store made with another spec, or any store without resume."""
    import pyarrow.parquet as pq

    from components.features.spec import FeatureSpecMismatch
    from components.features.store import INDEX_FILE, SPEC_FILE, FeatureStoreWriter, read_spec

    rows = _selected(config, manifest)
    if (local / SPEC_FILE).exists() and read_spec(local) != spec:
        raise FeatureSpecMismatch(
            f"store {config.output} was made with {read_spec(local).to_dict()}, this run makes {spec.to_dict()}; "
            "write to another output (or delete that store)"
        )
    # The default part writes the spec of a new store (so even a run with nothing to extract leaves a valid,
    # empty store) and merges the index on close, publishing the shards an interrupted run sealed.
    FeatureStoreWriter(local, spec, resume=True).close()
    stored = _stored(local)
    if stored and not config.resume:
        raise FileExistsError(f"store {config.output} already holds {stored} images; resume or use another output")
    done = set(pq.read_table(local / INDEX_FILE, columns=["image_id"]).column("image_id").to_pylist())
    return [r for r in rows if r["image_id"] not in done]


def _stored(local: Path) -> int:
    """Images in the merged index of a local store (0 when there is none yet)."""
    import pyarrow.parquet as pq

    from components.features.store import INDEX_FILE

    return pq.read_metadata(local / INDEX_FILE).num_rows if (local / INDEX_FILE).exists() else 0


def _stage_index(uri: str, local: Path) -> None:
    """Copy an S3 store's spec and shard indexes (not the shards) into the local staging folder."""
    from components import storage

    for rel in storage.list_files(uri):
        wanted = rel == "spec.json" or (rel.startswith("shards/") and rel.endswith(".idx.parquet"))
        if wanted and not (local / rel).exists():
            storage.download_file(storage.join(uri, rel), local / rel)


def _run_shares(shares: list[Share]) -> list[ShareResult]:
    """Extract every share: in this process for one, else one spawned process each."""
    if len(shares) == 1:
        return [extract_share(shares[0])]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: forking a process that already runs torch threads can deadlock.
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(extract_share, shares))


def _fold(result: FeaturesResult, parts: list[ShareResult], skipped: int) -> None:
    reasons: Counter[str] = Counter()
    for p in parts:
        reasons.update(q["code"] for q in p.quarantine)
    result.extracted = sum(p.extracted for p in parts)
    result.skipped_existing = skipped + sum(p.skipped_existing for p in parts)
    result.quarantined = sum(len(p.quarantine) for p in parts)
    result.reasons = dict(sorted(reasons.items()))
    regions = sum(p.regions for p in parts)
    result.mean_regions = regions / result.extracted if result.extracted else None
    result.extract_seconds = max((p.seconds for p in parts), default=0.0)
    result.images_per_s = result.extracted / result.extract_seconds if result.extract_seconds > 0 else None
    if result.seen != result.extracted + result.skipped_existing + result.quarantined:
        raise AssertionError(f"counts do not reconcile: {result}")  # a bug in this step, never a data problem


def _write_outputs(
    config: FeaturesConfig, local: Path, result: FeaturesResult, parts: list[ShareResult], prepared: PreparedBackend
) -> None:
    """extractor.json, quarantine.parquet (this run's rejections) and features_report.json, written atomically."""
    import pyarrow as pa

    from components import storage
    from components.features.store import atomic_write_bytes, atomic_write_table

    described = {k: v for k, v in asdict(prepared).items() if k != "report"}
    extractor = {"prepared": described, "limits": asdict(config.boxes)}
    atomic_write_bytes(local / EXTRACTOR_FILE, lambda f: f.write(json.dumps(extractor, indent=2).encode() + b"\n"))
    rows = sorted((q for p in parts for q in p.quarantine), key=lambda q: q["image_id"])
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS]))
    atomic_write_table(local / QUARANTINE_FILE, table)
    result.report_path = storage.join(config.output, REPORT_FILE)
    result.quarantine_path = storage.join(config.output, QUARANTINE_FILE)
    report = {"version": 1, **asdict(result), "config": _jsonable(asdict(config))}
    atomic_write_bytes(local / REPORT_FILE, lambda f: f.write(json.dumps(report, indent=2).encode() + b"\n"))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _check_quarantine(config: FeaturesConfig, result: FeaturesResult) -> None:
    if result.seen and result.quarantined / result.seen > config.max_quarantine_fraction:
        raise FeaturesFailed(
            f"{result.quarantined} of {result.seen} images quarantined (> {config.max_quarantine_fraction:.0%}): "
            f"{result.reasons}; see {result.quarantine_path}",
            result,
        )


def _run_import(config: FeaturesConfig) -> FeaturesResult:
    """The ``import`` backend: existing features files into the store (local output only)."""
    from components import storage
    from components.features.importers import import_features

    opts = config.imports
    assert opts is not None
    if storage.is_s3(config.output):
        raise BackendError("import writes a local store; import locally, then upload the folder")
    start = time.perf_counter()
    b = config.boxes
    res = import_features(
        list(opts.paths),
        opts.format,
        config.output,
        feature_size=opts.feature_size,
        num_classes=opts.num_classes,
        min_boxes=b.min_boxes,
        max_boxes=b.max_boxes,
        allow_uniform_class_probs=opts.allow_uniform_class_probs,
        shard_bytes=config.shard_bytes,
    )
    result = FeaturesResult(
        config.output,
        res.spec["backend"],
        res.spec,
        seen=res.seen,
        extracted=res.imported,
        skipped_existing=res.skipped_existing,
        quarantined=res.quarantined,
        reasons=dict(res.reasons),
        stored_total=_stored(Path(config.output)),
        seconds=time.perf_counter() - start,
        extract_seconds=res.seconds,
        images_per_s=res.imported / res.seconds if res.seconds > 0 else None,
        report_path=str(Path(config.output) / "import_report.json"),
        quarantine_path=res.quarantine_path,
    )
    _check_quarantine(config, result)
    return result
