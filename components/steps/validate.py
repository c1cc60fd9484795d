"""The validate step: Great Expectations suites over the dataset root (and optionally a feature store).

Row-level failures are quarantined with every reason; dataset-level failures (schema mismatch, too many
bad rows in a table, split leakage, unreadable files) fail the step with :class:`ValidationFailed`, after
the reports are written.  Outputs (see ``components/DATA_CONTRACTS.md``, "Validation"):
``quarantine.parquet``, ``gx_results.json``, ``data_docs/``, ``summary.md``, ``summary.html``,
``validation_report.json`` and, when the step passes, ``manifest.valid.parquet`` / ``captions.valid.parquet``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components import storage
from components.validation.engine import GxValidator, TableOutcome
from components.validation.features import FeatureSource
from components.validation.limits import ValidationLimits
from components.validation.quarantine import QUARANTINE_FILE, TableCounts, count, quarantine_table, to_json
from components.validation.reports import render_html, render_markdown

ACCEPTED_FILES = {"manifest": "manifest.valid.parquet", "captions": "captions.valid.parquet"}
REPORT_FILE = "validation_report.json"


@dataclass(frozen=True)
class ValidateConfig:
    """Inputs, outputs and limits of one validation run."""

    dataset: str
    """Dataset root written by ingest (local folder or ``s3://bucket/prefix``)."""
    output: str
    """Folder for the reports, the quarantine file and the accepted tables (local or ``s3://``)."""
    features: str | None = None
    """Feature store to validate as well (local or ``s3://``); None validates the dataset only."""
    limits: ValidationLimits = field(default_factory=ValidationLimits)
    """Thresholds of the suites (text lengths, image sizes, region counts, bad-row fraction...)."""
    tasks: bool = True
    """Validate ``annotations/instances.json`` and the task files under ``tasks/`` when present."""
    data_docs: bool = True
    """Render the Great Expectations Data Docs site into ``<output>/data_docs``."""
    workers: int = 4
    """Threads that read, hash and decode images."""
    cache_dir: str | None = None
    """Local folder an ``s3://`` dataset is mirrored into (default: a per-URI folder under the user cache)."""

    def __post_init__(self) -> None:
        if not self.dataset or not self.output:
            raise ValueError("dataset and output must be given")
        if not isinstance(self.limits, ValidationLimits):
            raise TypeError(f"limits must be ValidationLimits, got {type(self.limits).__name__}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        local = not storage.is_s3(self.dataset) and not storage.is_s3(self.output)
        if local and Path(self.output).resolve() == Path(self.dataset).resolve():
            raise ValueError("output must not be the dataset root itself (reports would mix with the data)")


@dataclass
class ValidateResult:
    """What the step found (also written as ``validation_report.json``)."""

    passed: bool
    """True when no dataset-level check failed."""
    tables: dict[str, TableCounts]
    """Counts per table: input rows = accepted + quarantined."""
    failures: list[str]
    """Dataset-level failures, ``"<table>: <why>"``."""
    output: str
    """Where the outputs were written."""
    seconds: float
    """Wall time of the run."""
    summary: str
    """The Markdown summary (``summary.md``)."""
    report: dict[str, Any]
    """The content of ``validation_report.json``."""

    @property
    def quarantined(self) -> int:
        return sum(c.quarantined for c in self.tables.values())


class ValidationFailed(RuntimeError):
    """The dataset failed a dataset-level check; ``summary`` is readable, ``result`` has the details."""

    def __init__(self, result: ValidateResult):
        self.result = result
        self.summary = result.summary
        reasons = "\n".join(f"  - {f}" for f in result.failures)
        super().__init__(f"data validation failed ({len(result.failures)} problem(s)):\n{reasons}\nsee {result.output}")


def _local_dataset(config: ValidateConfig) -> Path:
    if not storage.is_s3(config.dataset):
        return Path(config.dataset)
    cache = (
        config.cache_dir
        or Path.home() / ".cache" / "vilbert" / "datasets" / hashlib.sha256(config.dataset.encode()).hexdigest()[:16]
    )
    return storage.sync_down(config.dataset, cache)


@contextmanager
def _staging(output: str) -> Iterator[Path]:
    """A local folder to write into: ``output`` itself, or a temporary one uploaded to S3 at the end."""
    if not storage.is_s3(output):
        Path(output).mkdir(parents=True, exist_ok=True)
        yield Path(output)
        return
    with tempfile.TemporaryDirectory(prefix="vilbert-validate-") as tmp:
        yield Path(tmp)
        storage.sync_up(tmp, output)


def _validate_all(
    root: Path, config: ValidateConfig, validator: GxValidator, feature_store: FeatureSource | None
) -> tuple[list[TableOutcome], dict[str, pa.Table], list[str], Any]:
    """Run every suite in dependency order (images before what references them)."""
    from components.validation.captions import captions_check
    from components.validation.features import features_check
    from components.validation.flickr30k import validate_flickr30k
    from components.validation.manifest import manifest_check
    from components.validation.refcoco import validate_refcoco
    from components.validation.refs import ImageIndex
    from components.validation.taskfiles import coco_images_of, instances_check
    from components.validation.vcr import validate_vcr
    from components.validation.vqa import validate_vqa

    limits, failures = config.limits, []
    manifest, m_arrow = manifest_check(root, limits, config.workers)
    outcomes = [validator.validate(manifest)]
    if manifest.frame.empty and not manifest.problems:
        failures.append("manifest: no images")
    images = ImageIndex.from_manifest(manifest.frame, outcomes[0].accepted_rows)
    captions, c_arrow = captions_check(root, images, limits)
    outcomes.append(validator.validate(captions))
    arrow = {"manifest": m_arrow, "captions": c_arrow}
    if config.tasks:
        ground_truth = root / "annotations" / "instances.json"
        for path in (ground_truth, root / "tasks" / "refcoco+" / "instances.json"):
            if path.is_file():
                images.add_coco_images(coco_images_of(path))
        instances = instances_check("coco_instances", ground_truth, root, images, limits)
        if instances is not None:
            outcomes.append(validator.validate(instances))
        for run in (validate_vqa, validate_refcoco, validate_flickr30k, validate_vcr):
            outcomes += run(root, images, limits, validator.validate)
    store, opened = feature_store, None
    if store is None and config.features:
        from components.features.store import FeatureStore

        try:
            store = opened = FeatureStore.open(config.features)
        except Exception as exc:  # a store that cannot be opened fails the step with the reason
            failures.append(f"features: cannot open {config.features}: {exc}")
    try:
        if store is not None:
            outcomes.append(validator.validate(features_check(store, images, limits, config.features or "<store>")))
    finally:
        if opened is not None:
            opened.close()  # unmaps the shards
    spec = getattr(store, "spec", None)
    return outcomes, {k: v for k, v in arrow.items() if v is not None}, failures, spec


def _write(path: Path, data: bytes) -> None:
    storage.write_bytes(str(path), data)  # temporary file + rename: a reader never sees half a file


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def run_validate(config: ValidateConfig, *, feature_store: FeatureSource | None = None) -> ValidateResult:
    """Validate ``config.dataset`` (and a feature store), write every output, return the counts.

    ``feature_store`` passes an already opened store instead of ``config.features``.  Raises
    :class:`ValidationFailed` (after writing the reports) when a dataset-level check fails.
    """
    import great_expectations as gx

    start = time.perf_counter()
    root = _local_dataset(config)
    with _staging(config.output) as out:
        docs_tmp = out / ".data_docs.tmp"  # rendered here, then swapped in: never a half-built site
        shutil.rmtree(docs_tmp, ignore_errors=True)
        validator = GxValidator(docs_tmp if config.data_docs else None)
        outcomes, arrow, failures, spec = _validate_all(root, config, validator, feature_store)
        counts = {o.check.name: count(o, config.limits.max_bad_fraction) for o in outcomes}
        failures = [f"{c.table}: {f}" for c in counts.values() for f in c.failures] + failures
        passed = not failures

        _write(out / QUARANTINE_FILE, _parquet_bytes(quarantine_table(outcomes)))
        results = {
            "great_expectations_version": gx.__version__,
            "results": {o.check.name: o.gx_result for o in outcomes if o.gx_result is not None},
        }
        _write(out / "gx_results.json", to_json(results).encode())
        shutil.rmtree(out / "data_docs", ignore_errors=True)  # no stale site from an earlier run
        if config.data_docs and docs_tmp.is_dir():
            docs_tmp.rename(out / "data_docs")
        for table, name in ACCEPTED_FILES.items():
            if passed and table in arrow:
                accepted = next(o for o in outcomes if o.check.name == table).accepted_rows
                _write(out / name, _parquet_bytes(arrow[table].take(pa.array(accepted, pa.int64()))))
            else:  # a failed run leaves nothing a later step could mistake for validated data
                (out / name).unlink(missing_ok=True)
                if storage.is_s3(config.output):
                    storage.delete(storage.join(config.output, name))

        report = _report(config, outcomes, counts, failures, spec, time.perf_counter() - start)
        summary = render_markdown(report)
        _write(out / "summary.md", summary.encode())
        _write(out / "summary.html", render_html(report).encode())
        _write(out / REPORT_FILE, (json.dumps(report, indent=2) + "\n").encode())
    result = ValidateResult(passed, counts, failures, config.output, report["seconds"], summary, report)
    if not passed:
        raise ValidationFailed(result)
    return result


def _report(
    config: ValidateConfig,
    outcomes: list[TableOutcome],
    counts: dict[str, TableCounts],
    failures: list[str],
    spec: Any,
    seconds: float,
) -> dict[str, Any]:
    import great_expectations as gx

    examples = {}
    for o in outcomes:
        examples[o.check.name] = [
            {"row_id": o.check.row_id(i), "reason": "; ".join(r)} for i, r in list(o.row_reasons.items())[:5]
        ]
    outputs = {
        "quarantine": QUARANTINE_FILE,
        "GX results": "gx_results.json",
        "summary (HTML, offline)": "summary.html",
        "report": REPORT_FILE,
    }
    if config.data_docs:
        outputs["GX Data Docs"] = "data_docs/index.html"
    if not failures:
        outputs.update({f"accepted {t}": n for t, n in ACCEPTED_FILES.items() if t in counts})
    totals = {k: sum(getattr(c, k) for c in counts.values()) for k in ("input_rows", "accepted", "quarantined")}
    if spec is None:
        spec_dict = None
    elif hasattr(spec, "to_dict"):
        spec_dict = spec.to_dict()
    else:  # any object with the spec's fields (a dataclass, a namespace)
        is_instance = dataclasses.is_dataclass(spec) and not isinstance(spec, type)
        spec_dict = dataclasses.asdict(spec) if is_instance else dict(vars(spec))
    return {
        "passed": not failures,
        "dataset": config.dataset,
        "features": config.features,
        "output": config.output,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "seconds": round(seconds, 3),
        "great_expectations_version": gx.__version__,
        "limits": json.loads(to_json(dataclasses.asdict(config.limits))),
        "failures": failures,
        "totals": totals,
        "tables": {name: c.to_dict() for name, c in counts.items()},
        "examples": examples,
        "feature_spec": json.loads(to_json(spec_dict)) if spec_dict is not None else None,
        "outputs": outputs,
    }
