"""The ingest step: read a source, check every image and caption, write a dataset root.

Output (``components/DATA_CONTRACTS.md``, "Dataset root"): ``images/<image_id>.<ext>`` (the source bytes,
never re-encoded; the extension follows the decoded format), ``manifest.parquet``, ``captions.parquet``,
``quarantine.parquet``, ``ingest_report.json`` and the source's native files.  Local or ``s3://``.

Policy:

* Every image is decoded with Pillow (``verify``, then a full ``load``).  Rejected: zero-byte and
  oversized files, unknown or disallowed formats (default JPEG, PNG, WEBP: TIFF, GIF, BMP, ... are
  refused), corrupt and truncated files, and more than ``max_image_pixels`` pixels (checked from the
  header before decoding: the decompression-bomb guard).  Greyscale, palette, CMYK and alpha images are
  accepted as stored; their PIL ``mode`` is a manifest column, and the feature extractor converts to RGB.
* Image ids become file names, so they must match ``[A-Za-z0-9][A-Za-z0-9._-]*`` (128 characters at
  most); a second image with an id already taken is rejected.  Readers refuse paths that leave the
  source root and symbolic links.
* Captions lose surrounding whitespace; empty, non-UTF-8 or too long captions, repeated caption ids and
  captions whose image was not stored are rejected.  A caption's split is its image's split.
* Every rejected row goes to ``quarantine.parquet`` with its reason; per table, seen = stored (+ skipped
  unchanged, for images) + quarantined, and ``ingest_report.json`` says so.
* Re-running over the same output skips images whose sha256 is unchanged and whose file is still there
  (no rewrite); files of earlier runs that the new manifest no longer names are removed once the new
  manifest is in place.  Every file is written atomically (storage.write_bytes).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from components import storage
from components.sources import is_utf8, normalize_split
from components.sources.base import Source, SourceCaption, SourceImage, SourceProblem

SPLITS = ("train", "val", "test")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NATIVE_FOLDERS = ("annotations", "tasks")
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}

MANIFEST_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("path", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
     ("height", pa.int32()), ("format", pa.string()), ("mode", pa.string()), ("split", pa.string()),
     ("source", pa.string())]
)  # fmt: skip
CAPTIONS_SCHEMA = pa.schema(
    [("caption_id", pa.string()), ("image_id", pa.string()), ("caption", pa.string()), ("split", pa.string()),
     ("source", pa.string())]
)  # fmt: skip
QUARANTINE_SCHEMA = pa.schema(
    [("table", pa.string()), ("row_id", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
     ("origin", pa.string()), *MANIFEST_SCHEMA, ("caption_id", pa.string()), ("caption", pa.string())]
)  # fmt: skip


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest, where to, and the acceptance rules."""

    source: str
    """Source URI: ``synthetic://...``, a local folder or file, or ``s3://bucket/prefix`` (components.sources)."""
    output: str
    """Dataset root to write: a local folder or ``s3://bucket/prefix``."""
    split_policy: str = "source"
    """``source``: keep the source's split and hash only images without one; ``hash``: always hash the image id."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Shares of train, val, test for hashed splits (sum to 1)."""
    split_salt: str = ""
    """Mixed into the split hash: another salt draws another (still deterministic) split."""
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    """PIL format names accepted; other decodable formats are quarantined as ``unsupported_format``."""
    max_image_pixels: int = 40_000_000
    """Images with more pixels (width x height, read from the header) are rejected: decompression-bomb guard."""
    max_image_bytes: int = 32 * 1024 * 1024
    """Image files larger than this are rejected before decoding."""
    max_caption_chars: int = 1000
    """Captions longer than this (after stripping) are rejected."""
    workers: int = 8
    """Threads that read, decode and write images (I/O bound on S3)."""
    remove_stale: bool = True
    """Delete files under ``images/`` that the new manifest does not name (left by earlier runs)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in self.split_fractions))
        object.__setattr__(self, "allowed_formats", tuple(f.upper() for f in self.allowed_formats))
        Image.init()
        problems = [
            (not self.source.strip(), "source is empty"),
            (not self.output.strip(), "output is empty"),
            (self.output.rstrip("/") == self.source.rstrip("/"), "output must differ from the source"),
            (
                self.split_policy not in ("source", "hash"),
                f"split_policy must be source or hash, not {self.split_policy}",
            ),
            (len(self.split_fractions) != 3 or min(self.split_fractions) < 0, "split_fractions: three shares >= 0"),
            (
                abs(sum(self.split_fractions) - 1) > 1e-6,
                f"split_fractions must sum to 1, not {sum(self.split_fractions)}",
            ),
            (not self.allowed_formats, "allowed_formats is empty"),
            (bool(set(self.allowed_formats) - set(Image.OPEN)), f"unknown PIL formats in {self.allowed_formats}"),
            (self.max_image_pixels <= 0, "max_image_pixels must be > 0"),
            # Pillow itself refuses images over twice its MAX_IMAGE_PIXELS while opening them.
            (self.max_image_pixels > 2 * (Image.MAX_IMAGE_PIXELS or 1 << 62), "max_image_pixels above Pillow's limit"),
            (self.max_image_bytes <= 0, "max_image_bytes must be > 0"),
            (self.max_caption_chars <= 0, "max_caption_chars must be > 0"),
            (self.workers < 1, "workers must be >= 1"),
        ]
        bad = [msg for failed, msg in problems if failed]
        if bad:
            raise ValueError("invalid IngestConfig: " + "; ".join(bad))


@dataclass
class TableCounts:
    """Rows of one table: seen = stored + skipped_unchanged + quarantined."""

    seen: int = 0
    stored: int = 0
    skipped_unchanged: int = 0
    quarantined: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def reconciles(self) -> bool:
        return self.seen == self.stored + self.skipped_unchanged + self.quarantined

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": dict(sorted(self.reasons.items()))}


@dataclass
class IngestResult:
    """The step's metrics; the same numbers are in ``ingest_report.json``."""

    output: str
    images: TableCounts
    captions: TableCounts
    files: TableCounts
    splits: dict[str, int]
    removed_stale: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images.seen / self.seconds if self.seconds > 0 else 0.0


class Rejected(Exception):
    """A row fails a check: ``reason`` (stable, machine-readable), ``detail`` (for people), known fields."""

    def __init__(self, reason: str, detail: str = "", **fields: Any):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.fields = reason, detail, fields


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str


def inspect_image(data: bytes, allowed_formats: tuple[str, ...], max_pixels: int) -> ImageInfo:
    """Decode ``data`` fully; raise :class:`Rejected` (empty_file, unsupported_format, too_many_pixels,
    truncated_image, corrupt_image) when it is not an acceptable image."""
    if not data:
        raise Rejected("empty_file", "zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = str(im.format), im.size
            known = {"format": fmt, "width": width, "height": height}
            if fmt not in allowed_formats:
                raise Rejected("unsupported_format", f"{fmt} is not one of {', '.join(allowed_formats)}", **known)
            if width * height > max_pixels:  # before any pixel is decoded
                raise Rejected("too_many_pixels", f"{width}x{height} > {max_pixels} pixels", **known)
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return ImageInfo(fmt, width, height, im.mode)
    except Rejected:
        raise
    except Image.DecompressionBombError as exc:
        raise Rejected("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError:
        raise Rejected("unsupported_format", "not an image format Pillow recognises") from None
    except Exception as exc:  # Pillow signals damage with many types (OSError, SyntaxError, EOFError, ...)
        text = f"{type(exc).__name__}: {exc}"
        reason = "truncated_image" if isinstance(exc, EOFError) or "truncat" in text.lower() else "corrupt_image"
        raise Rejected(reason, text) from None


def hash_split(image_id: str, fractions: tuple[float, ...], salt: str = "") -> str:
    """Deterministic split for an image id: sha256(salt + id) as a number in [0, 1) against the shares."""
    x = int.from_bytes(hashlib.sha256(f"{salt}{image_id}".encode()).digest()[:8], "big") / 2**64
    bound = 0.0
    for name, share in zip(SPLITS, fractions, strict=True):
        bound += share
        if x < bound:
            return name
    return next(n for n, s in reversed(list(zip(SPLITS, fractions, strict=True))) if s > 0)


def _parquet_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def _printable(text: Any) -> str | None:
    """Text for a Parquet cell: bytes that were not UTF-8 become visible ``\\xNN`` escapes."""
    if text is None:
        return None
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Ingest:
    """One run's state; :func:`run_ingest` is the entry point."""

    def __init__(self, config: IngestConfig, source: Source):
        self.config, self.source, self.out = config, source, config.output
        self.uri = getattr(source, "uri", config.source)
        self.images, self.captions, self.files = TableCounts(), TableCounts(), TableCounts()
        self.manifest: list[dict[str, Any]] = []
        self.quarantine: list[dict[str, Any]] = []
        self.previous = self._previous_manifest()
        self.existing = {f"images/{i.path}": i.size for i in storage.list_file_info(storage.join(self.out, "images"))}

    def _previous_manifest(self) -> dict[str, dict[str, Any]]:
        uri = storage.join(self.out, "manifest.parquet")
        if not storage.exists(uri):
            return {}
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        return {row["image_id"]: row for row in table.to_pylist()}

    def reject(self, table: str, counts: TableCounts, row_id: str, why: Rejected, **fields: Any) -> None:
        counts.quarantined += 1
        counts.reasons[why.reason] += 1
        row = {"table": table, "row_id": _printable(row_id), "reason": why.reason, "detail": _printable(why.detail)}
        row |= {k: _printable(v) if isinstance(v, str) else v for k, v in (fields | why.fields).items()}
        self.quarantine.append(row | {"source": self.uri})

    def split_for(self, image: SourceImage) -> str:
        split = normalize_split(image.split)
        if self.config.split_policy == "hash" or not split:
            return hash_split(image.image_id, self.config.split_fractions, self.config.split_salt)
        if split not in SPLITS:
            raise Rejected("bad_split", f"split {image.split!r} is not one of {', '.join(SPLITS)}")
        return split

    def process(self, image: SourceImage) -> tuple[str, dict[str, Any] | Rejected]:
        """Check and store one image (runs on a worker thread): ("stored"|"skipped"|"rejected", row or why)."""
        cfg, data = self.config, image.data
        sha = hashlib.sha256(data).hexdigest()
        try:
            split = self.split_for(image)
            if len(data) > cfg.max_image_bytes:
                raise Rejected("file_too_large", f"{len(data)} bytes > {cfg.max_image_bytes}")
            base = {"image_id": image.image_id, "sha256": sha, "split": split, "source": self.uri}
            prev = self.previous.get(image.image_id)
            if (
                prev is not None
                and prev["sha256"] == sha
                and self.existing.get(prev["path"]) == len(data)
                and prev["format"] in cfg.allowed_formats
                and prev["width"] * prev["height"] <= cfg.max_image_pixels
            ):
                return "skipped", prev | base
            info = inspect_image(data, cfg.allowed_formats, cfg.max_image_pixels)
        except Rejected as why:
            why.fields = {"sha256": sha, **why.fields}
            return "rejected", why
        path = f"images/{image.image_id}.{_EXTENSIONS.get(info.format, info.format.lower())}"
        storage.write_bytes(storage.join(self.out, path), data)
        return "stored", base | {"path": path, "width": info.width, "height": info.height} | {
            "format": info.format,
            "mode": info.mode,
        }

    def precheck(self, progress: Any) -> Any:
        """Yield the source's images in order, rejecting problems, bad ids and repeated ids on the way."""
        taken: set[str] = set()
        for item in self.source.images():
            self.images.seen += 1
            progress.update(1)
            if isinstance(item, SourceProblem):
                why = Rejected(item.reason, item.origin)
                self.reject("images", self.images, item.row_id, why, image_id=item.row_id, origin=item.origin)
                continue
            known = {"image_id": item.image_id, "origin": item.origin}
            if not ID_PATTERN.fullmatch(item.image_id):
                why = Rejected("bad_image_id", f"{item.image_id!r} must match {ID_PATTERN.pattern}")
                self.reject("images", self.images, item.image_id, why, **known)
            elif item.image_id in taken:
                self.reject("images", self.images, item.image_id, Rejected("duplicate_image_id", item.origin), **known)
            else:
                taken.add(item.image_id)
                yield item

    def run_images(self) -> None:
        from tqdm import tqdm

        with tqdm(desc="ingest images", unit="img", disable=not self.config.progress) as bar:
            items = self.precheck(bar)
            for image, (status, result) in zip_source(items, self.process, self.config.workers):
                if isinstance(result, Rejected):
                    self.reject("images", self.images, image.image_id, result, image_id=image.image_id,
                                origin=image.origin, split=normalize_split(image.split) or None)  # fmt: skip
                    continue
                self.manifest.append(result)
                if status == "stored":
                    self.images.stored += 1
                else:
                    self.images.skipped_unchanged += 1

    def run_captions(self) -> list[dict[str, Any]]:
        splits = {row["image_id"]: row["split"] for row in self.manifest}
        quarantined_images = {row["row_id"] for row in self.quarantine if row["table"] == "images"}
        taken: set[str] = set()
        rows = []
        for item in self.source.captions():
            self.captions.seen += 1
            try:
                if isinstance(item, SourceProblem):
                    raise Rejected(item.reason, item.origin, origin=item.origin)
                rows.append(self._check_caption(item, splits, quarantined_images, taken))
                self.captions.stored += 1
            except Rejected as why:
                fields = {} if isinstance(item, SourceProblem) else {"image_id": item.image_id, "caption": item.caption}
                row_id = item.row_id if isinstance(item, SourceProblem) else item.caption_id
                self.reject("captions", self.captions, row_id, why, caption_id=row_id, **fields)
        return rows

    def _check_caption(self, item: SourceCaption, splits: dict, quarantined: set, taken: set) -> dict[str, Any]:
        text = item.caption.strip() if isinstance(item.caption, str) else ""
        if item.caption_id in taken:
            raise Rejected("duplicate_caption_id", f"caption id {item.caption_id!r} seen before")
        taken.add(item.caption_id)
        if not is_utf8(text):
            raise Rejected("caption_not_utf8", "the caption's bytes are not valid UTF-8")
        if not text:
            raise Rejected("empty_caption", "empty or whitespace only")
        if len(text) > self.config.max_caption_chars:
            raise Rejected("caption_too_long", f"{len(text)} characters > {self.config.max_caption_chars}")
        if item.image_id not in splits:
            why = "its image was quarantined" if item.image_id in quarantined else "no such image in the source"
            raise Rejected("image_not_ingested" if item.image_id in quarantined else "unknown_image", why)
        return {"caption_id": item.caption_id, "image_id": item.image_id, "caption": text,
                "split": splits[item.image_id], "source": self.uri}  # fmt: skip

    def run_native_files(self) -> None:
        for rel, data in sorted(self.source.native_files().files.items()):
            self.files.seen += 1
            try:
                norm = storage.safe_relative(str(rel))
                if PurePosixPath(norm).parts[0] not in NATIVE_FOLDERS:
                    raise Rejected("bad_native_path", f"{rel} is not under {' or '.join(NATIVE_FOLDERS)}/")
            except storage.UnsafePath as exc:
                self.reject("files", self.files, str(rel), Rejected("path_escapes_root", str(exc)), path=str(rel))
                continue
            except Rejected as why:
                self.reject("files", self.files, str(rel), why, path=str(rel))
                continue
            storage.write_bytes(storage.child(self.out, norm), data)
            self.files.stored += 1


def zip_source(items: Any, fn: Any, workers: int) -> Any:
    """``(item, fn(item))`` for each item, computed on ``workers`` threads, in input order."""
    return storage.map_ordered(lambda item: (item, fn(item)), items, workers)


def run_ingest(config: IngestConfig, source: Source | None = None) -> IngestResult:
    """Ingest ``config.source`` (or the given ``source`` object) into ``config.output``; see the module docstring."""
    from components.sources import open_source

    start = time.perf_counter()
    source = source if source is not None else open_source(config.source, workers=config.workers)
    run = _Ingest(config, source)
    run.run_images()
    captions = run.run_captions()
    run.run_native_files()
    run.manifest.sort(key=lambda r: r["image_id"])
    captions.sort(key=lambda r: (r["image_id"], r["caption_id"]))
    # The manifest goes last: a reader never sees a manifest whose captions or images are not there yet.
    for name, rows, schema in (
        ("quarantine.parquet", run.quarantine, QUARANTINE_SCHEMA),
        ("captions.parquet", captions, CAPTIONS_SCHEMA),
        ("manifest.parquet", run.manifest, MANIFEST_SCHEMA),
    ):
        storage.write_bytes(storage.join(config.output, name), _parquet_bytes(rows, schema))
    removed = 0
    if config.remove_stale:
        keep = {row["path"] for row in run.manifest}
        for path in sorted(set(run.existing) - keep):
            storage.delete(storage.join(config.output, path))
            removed += 1
    result = IngestResult(
        output=config.output,
        images=run.images,
        captions=run.captions,
        files=run.files,
        splits=dict(sorted(Counter(row["split"] for row in run.manifest).items())),
        removed_stale=removed,
        seconds=time.perf_counter() - start,
    )
    storage.write_bytes(storage.join(config.output, "ingest_report.json"), report_json(result, config, run.uri))
    return result


def report_json(result: IngestResult, config: IngestConfig, source_uri: str) -> bytes:
    """``ingest_report.json``: image counts at the top level (seen, stored, skipped_unchanged, quarantined,
    reasons), then the caption and native-file tables, splits, and the config."""
    report = {
        "version": 1,
        "source": source_uri,
        "output": result.output,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(result.seconds, 3),
        **result.images.as_dict(),
        "captions": result.captions.as_dict(),
        "files": result.files.as_dict(),
        "splits": result.splits,
        "removed_stale": result.removed_stale,
        "reconciled": all(t.reconciles() for t in (result.images, result.captions, result.files)),
        "config": asdict(config),
    }
    return (json.dumps(report, indent=2) + "\n").encode()
