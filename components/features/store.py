"""The region-feature store: a sharded, resumable writer and a memory-mapped random-access reader.

`FeatureSpec` and `RegionFeatures` live in :mod:`components.features.spec` and are re-exported here.

On disk (the full description, readable without this code, is in ``components/DATA_CONTRACTS.md``)::

    <store>/spec.json                     FeatureSpec as JSON
    <store>/index.parquet                 merged index: one row per image (what readers use)
    <store>/shards/<part>-<n>.bin         concatenated records, 64-byte aligned
    <store>/shards/<part>-<n>.idx.parquet that shard's index rows; written (atomically) when the shard is sealed

A record is ``boxes`` <f4 [R, 4] | ``features`` <f2 [R, D] | ``class_probs`` <f2 [R, C], back to back.
A shard counts only once its ``.idx.parquet`` exists, so a crash leaves unindexed bytes that a resumed writer
deletes and redoes; readers never see them. Writers with different ``part`` names write disjoint files and
:func:`merge_index` combines their sealed shards into ``index.parquet``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components import storage

from .spec import (
    BOX_DTYPE,
    VALUE_DTYPE,
    FeatureSpec,
    FeatureSpecMismatch,
    InvalidRegionFeatures,
    RegionFeatures,
)

__all__ = [
    "CorruptStoreError",
    "DuplicateImageError",
    "FeatureSpec",
    "FeatureSpecMismatch",
    "FeatureStore",
    "FeatureStoreWriter",
    "InvalidRegionFeatures",
    "RegionFeatures",
    "merge_index",
    "read_spec",
]

SPEC_FILE = "spec.json"
INDEX_FILE = "index.parquet"
SHARDS_DIR = "shards"
DEFAULT_PART = "main"
RECORD_ALIGN = 64  # record starts are 64-byte aligned so the float32/float16 views are aligned too
SPEC_SHA_KEY = b"vilbert.feature_spec_sha256"
INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("nbytes", pa.int64()),
        ("num_boxes", pa.int32()),
        ("image_w", pa.int32()),
        ("image_h", pa.int32()),
        ("crc32", pa.uint32()),
    ]
)
_PART_RE = re.compile(r"^[A-Za-z0-9_]+$")  # no '-' or '.': the shard file name is <part>-<n>.bin
_SHARD_RE = re.compile(r"^(?P<part>[A-Za-z0-9_]+)-(?P<n>\d{5,})\.bin$")


class DuplicateImageError(ValueError):
    """An image id is stored more than once (within a writer, or across parts at merge)."""


class CorruptStoreError(RuntimeError):
    """The files of a store contradict each other (index vs spec vs shards)."""


def _align(n: int) -> int:
    return -(-n // RECORD_ALIGN) * RECORD_ALIGN


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: never a half-written file."""
    storage.atomic_write_local(path, write)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    atomic_write_bytes(path, lambda f: pq.write_table(table, f))


def read_spec(root: str | Path) -> FeatureSpec:
    """The spec of the store at ``root``."""
    path = Path(root) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"not a feature store (no {SPEC_FILE}): {root}")
    return FeatureSpec.from_dict(json.loads(path.read_text()))


def _sealed_indexes(root: Path) -> list[Path]:
    return sorted((root / SHARDS_DIR).glob("*.idx.parquet"))


def _index_table(columns: dict[str, list], spec: FeatureSpec) -> pa.Table:
    table = pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)
    return table.replace_schema_metadata({SPEC_SHA_KEY: spec.sha256().encode()})


class FeatureStoreWriter:
    """Append validated :class:`RegionFeatures` to a store's shards; a context manager.

    ``part`` names this writer's files (one part per process / rank); several parts may be written at once.
    The default part also merges the index on close; named parts leave that to :func:`merge_index`.
    ``resume=True`` keeps what earlier runs sealed and skips it (``image_id in writer``); records of an
    unsealed shard are deleted and must be added again.
    """

    def __init__(
        self,
        root: str | Path,
        spec: FeatureSpec,
        shard_bytes: int = 256 * 2**20,
        resume: bool = True,
        part: str | None = None,
    ):
        if shard_bytes <= 0:
            raise ValueError("shard_bytes must be positive")
        self.root, self.spec, self.shard_bytes = Path(root), spec, shard_bytes
        self.part = DEFAULT_PART if part is None else part
        self._merge_on_close = part is None
        if not _PART_RE.match(self.part):
            raise ValueError(f"part must match {_PART_RE.pattern}, got {self.part!r}")
        shards = self.root / SHARDS_DIR
        shards.mkdir(parents=True, exist_ok=True)
        spec_path = self.root / SPEC_FILE
        if spec_path.exists():
            existing = read_spec(self.root)
            if existing != spec:
                raise FeatureSpecMismatch(f"store {self.root} holds spec {existing.to_dict()}, not {spec.to_dict()}")
        else:
            atomic_write_bytes(spec_path, lambda f: f.write(json.dumps(spec.to_dict(), indent=2).encode() + b"\n"))
        # One writer per part at a time; the lock dies with the process, so a crash never leaves it stuck.
        self._lock = open(shards / f"{self.part}.lock", "a+b")  # noqa: SIM115 - held for the writer's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another writer holds part {self.part!r} of {self.root}") from None
        try:
            self._ids: set[str] = set()
            own_sealed: set[str] = set()
            for idx in _sealed_indexes(self.root):
                table = pq.read_table(idx, columns=["image_id"])
                self._ids.update(table.column("image_id").to_pylist())
                if idx.name.startswith(f"{self.part}-"):
                    own_sealed.add(idx.name.removesuffix(".idx.parquet") + ".bin")
            if own_sealed and not resume:
                raise FileExistsError(f"part {self.part!r} of {self.root} already has data; pass resume=True")
            self._next = 0
            for path in shards.iterdir():
                m = _SHARD_RE.match(path.name)
                if m and m["part"] == self.part:
                    self._next = max(self._next, int(m["n"]) + 1)
                    if path.name not in own_sealed:  # an unsealed shard of a crashed run: its records get redone
                        path.unlink()
        except BaseException:
            self._lock.close()
            raise
        self._file: BinaryIO | None = None
        self._shard_name = ""
        self._pos = 0
        self._rows: dict[str, list] = {}
        self._failed = False
        self.added = 0
        """Records added by this writer object."""

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._ids

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, rf: RegionFeatures) -> None:
        """Validate ``rf`` and append it (features / class_probs rounded to float16)."""
        if self._lock.closed or self._failed:
            raise RuntimeError("writer is closed" if self._lock.closed else "a write failed; reopen with resume=True")
        rf.validate(self.spec)
        if rf.image_id in self._ids:
            raise DuplicateImageError(f"image {rf.image_id!r} is already stored")
        payload = b"".join(
            (
                np.ascontiguousarray(rf.boxes, dtype=BOX_DTYPE).tobytes(),
                np.ascontiguousarray(rf.features, dtype=VALUE_DTYPE).tobytes(),
                np.ascontiguousarray(rf.class_probs, dtype=VALUE_DTYPE).tobytes(),
            )
        )
        if self._file is not None and self._pos > 0 and self._pos + len(payload) > self.shard_bytes:
            self._seal()
        if self._file is None:
            self._shard_name = f"{self.part}-{self._next:05d}.bin"
            self._next += 1
            self._file = open(self.root / SHARDS_DIR / self._shard_name, "wb")  # noqa: SIM115 - closed in _seal
            self._pos = 0
            self._rows = {name: [] for name in INDEX_SCHEMA.names}
        try:
            self._file.write(payload + bytes(_align(len(payload)) - len(payload)))
        except BaseException:
            # The shard's tail is unknown now: never seal it. Its records are redone by a resumed writer.
            self._failed = True
            raise
        row = {
            "image_id": rf.image_id,
            "shard": self._shard_name,
            "offset": self._pos,
            "nbytes": len(payload),
            "num_boxes": rf.boxes.shape[0],
            "image_w": int(rf.image_w),
            "image_h": int(rf.image_h),
            "crc32": zlib.crc32(payload),
        }
        for name, value in row.items():
            self._rows[name].append(value)
        self._pos += _align(len(payload))
        self._ids.add(rf.image_id)
        self.added += 1

    def _seal(self) -> None:
        """Make the current shard durable, then publish its index (the commit point)."""
        if self._file is None:
            return
        if self._failed:  # drop the shard; its images count as not stored (a resumed writer redoes them)
            self._file.close()
            self._file = None
            (self.root / SHARDS_DIR / self._shard_name).unlink(missing_ok=True)
            self._ids.difference_update(self._rows["image_id"])
            self.added -= len(self._rows["image_id"])
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        idx = self.root / SHARDS_DIR / self._shard_name.replace(".bin", ".idx.parquet")
        atomic_write_table(idx, _index_table(self._rows, self.spec))

    def flush(self) -> None:
        """Seal the current shard now (later records start a new one), so they survive a crash."""
        self._seal()

    def close(self) -> None:
        """Seal the open shard, merge the index (default part only) and release the part lock."""
        if self._lock.closed:
            return
        try:
            self._seal()
            if self._merge_on_close:
                merge_index(self.root)
        finally:
            self._lock.close()


def merge_index(root: str | Path) -> int:
    """Combine every sealed shard index into ``index.parquet`` (atomically); return the number of images.

    Raises :class:`DuplicateImageError` when an image id appears in more than one shard.
    """
    root = Path(root)
    spec = read_spec(root)
    tables = []
    for idx in _sealed_indexes(root):
        table = pq.read_table(idx)
        sha = (table.schema.metadata or {}).get(SPEC_SHA_KEY, b"").decode()
        if sha != spec.sha256():
            raise CorruptStoreError(f"{idx} was written for another feature spec ({sha or 'none'})")
        tables.append(table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA))
    merged = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    counts = pc.value_counts(merged.column("image_id"))
    dups = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    if dups:
        raise DuplicateImageError(f"{len(dups)} image ids stored more than once, e.g. {dups[:10]}")
    atomic_write_table(root / INDEX_FILE, merged.replace_schema_metadata({SPEC_SHA_KEY: spec.sha256().encode()}))
    return merged.num_rows


def _cache_dir_for(uri: str) -> Path:
    base = Path(os.environ.get("VILBERT_CACHE_DIR", Path.home() / ".cache" / "vilbert"))
    return base / "feature-stores" / hashlib.sha256(uri.encode()).hexdigest()[:16]


class FeatureStore:
    """Read-only random access to a store; memory maps open lazily in each process (DataLoader-worker safe)."""

    MAX_OPEN_SHARDS = 128  # each map holds a file descriptor; keep well below the usual 1024 limit

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.spec = read_spec(self.root)
        path = self.root / INDEX_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} missing (sealed shards are published by merge_index)")
        table = pq.read_table(path)
        sha = (table.schema.metadata or {}).get(SPEC_SHA_KEY, b"").decode()
        if sha != self.spec.sha256():
            raise CorruptStoreError(f"{path} was written for another feature spec than {self.root / SPEC_FILE}")
        self._ids: list[str] = table.column("image_id").to_pylist()
        self._row = {image_id: i for i, image_id in enumerate(self._ids)}
        shard = table.column("shard").combine_chunks().dictionary_encode()
        self._shard_code = shard.indices.to_numpy(zero_copy_only=False)
        self._shard_names: list[str] = shard.dictionary.to_pylist()
        col = {name: table.column(name).to_numpy() for name in ("offset", "nbytes", "num_boxes", "image_w", "image_h")}
        self._offset, self._nbytes, self._num_boxes = col["offset"], col["nbytes"], col["num_boxes"]
        self._image_w, self._image_h = col["image_w"], col["image_h"]
        self._crc = table.column("crc32").to_numpy()
        self._check_index()
        self._maps: OrderedDict[int, mmap.mmap] = OrderedDict()
        self._pid = os.getpid()

    def _check_index(self) -> None:
        if len(self._row) != len(self._ids):
            raise CorruptStoreError(f"{self.root}: duplicate image ids in {INDEX_FILE}")
        expected = self._num_boxes.astype(np.int64) * self.spec.record_nbytes(1)
        if len(expected) and (self._nbytes != expected).any():
            raise CorruptStoreError(f"{self.root}: record sizes in {INDEX_FILE} do not match the spec")
        ends = np.zeros(len(self._shard_names), dtype=np.int64)
        np.maximum.at(ends, self._shard_code, self._offset + self._nbytes)
        for name, end in zip(self._shard_names, ends.tolist(), strict=True):
            path = self.root / SHARDS_DIR / name
            if not path.exists() or path.stat().st_size < end:
                raise CorruptStoreError(f"{path} is missing or shorter than its indexed records")

    @classmethod
    def open(cls, uri: str | Path, cache_dir: str | Path | None = None) -> FeatureStore:
        """Open a local store, or sync ``s3://bucket/prefix`` down to ``cache_dir`` (default: a per-URI cache)."""
        text = str(uri)
        if text.startswith("s3://"):
            from components.storage import sync_down  # lazy: boto3 only when a store lives in S3

            local = Path(cache_dir) if cache_dir is not None else _cache_dir_for(text)
            local.mkdir(parents=True, exist_ok=True)
            return cls(sync_down(text, local))
        return cls(text)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def image_ids(self) -> list[str]:
        """All image ids, in index order."""
        return list(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.image_ids())

    def _map(self, code: int) -> mmap.mmap:
        if self._pid != os.getpid():  # forked (DataLoader worker): never share the parent's maps
            self._maps, self._pid = OrderedDict(), os.getpid()
        mm = self._maps.get(code)
        if mm is None:
            with open(self.root / SHARDS_DIR / self._shard_names[code], "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[code] = mm
            if len(self._maps) > self.MAX_OPEN_SHARDS:
                self._close_map(self._maps.popitem(last=False)[1])
        else:
            self._maps.move_to_end(code)
        return mm

    def _record(self, row: int) -> tuple[mmap.mmap, int]:
        return self._map(int(self._shard_code[row])), int(self._offset[row])

    def __getitem__(self, image_id: str) -> RegionFeatures:
        return self.get(image_id)

    def get(self, image_id: str, copy: bool = True) -> RegionFeatures:
        """One image's regions. ``copy=False`` returns read-only views into the shard's memory map (no copy;
        valid while the store is open), for readers that convert or batch the arrays right away."""
        row = self._row.get(image_id)
        if row is None:
            raise KeyError(f"image {image_id!r} is not in the feature store {self.root}")
        mm, offset = self._record(row)
        r, d, c = int(self._num_boxes[row]), self.spec.feature_size, self.spec.num_classes
        arrays = []
        for dtype, cols in ((BOX_DTYPE, 4), (VALUE_DTYPE, d), (VALUE_DTYPE, c)):
            view = np.frombuffer(mm, dtype, r * cols, offset).reshape(r, cols)
            arrays.append(view.copy() if copy else view)
            offset += view.nbytes
        boxes, features, class_probs = arrays
        return RegionFeatures(image_id, boxes, features, class_probs, int(self._image_w[row]), int(self._image_h[row]))

    def verify(self) -> list[str]:
        """Re-read every record and return the ids whose bytes no longer match their crc32."""
        bad = []
        for row, image_id in enumerate(self._ids):
            mm, offset = self._record(row)
            if zlib.crc32(mm[offset : offset + int(self._nbytes[row])]) != int(self._crc[row]):
                bad.append(image_id)
        return bad

    @staticmethod
    def _close_map(mm: mmap.mmap) -> None:
        with contextlib.suppress(BufferError):  # views from get(copy=False) alive: closed when they are freed
            mm.close()

    def close(self) -> None:
        for mm in self._maps.values():
            self._close_map(mm)
        self._maps.clear()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # spawn-started workers get no maps, only the index
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state
