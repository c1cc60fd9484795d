"""Import existing region features into a feature store, validated on the way in.

Formats (details and exact layouts in ``components/DATA_CONTRACTS.md``):

- ``tsv``: bottom-up-attention TSV, one image per line, tab-separated, no header:
  ``image_id, image_w, image_h, num_boxes, boxes, features[, cls_prob]``; arrays are base64 of little-endian
  float32 (``boxes`` [R, 4], ``features`` [R, D], ``cls_prob`` [R, C]). Lines written by Python 3's csv module
  around ``bytes`` (``b'...'``) are accepted too. Other column orders: ``ImportConfig.tsv_fields``.
- ``lmdb``: the original ViLBERT feature LMDB (``script/convert_*_lmdb.py``): key ``str(image_id).encode()``,
  value ``pickle.dumps`` of the TSV row dict (base64 strings) or of a dict of numpy arrays (vilbert-multi-task),
  plus key ``b"keys"`` holding the pickled list of keys. Values are read with a restricted unpickler
  (:func:`safe_loads`) that only rebuilds builtin containers/scalars and numpy arrays; anything else is refused.
- ``hdf5``: root datasets ``image_id`` [N], ``features`` [N, K, D], ``boxes`` [N, K, 4], ``image_w`` /
  ``image_h`` [N], optional ``num_boxes`` [N] and ``cls_prob`` [N, K, C]; or one group per image id holding
  ``features``, ``boxes``, optional ``cls_prob`` and ``image_w`` / ``image_h`` (datasets or attributes).

Sources without class probabilities are refused unless ``allow_uniform_class_probs``: then every region gets
the uniform distribution and the spec's backend carries ``+uniform-class-probs`` (useless as a masked-region
KL target, harmless for fine-tuning). Bad records go to a quarantine Parquet file with their reason; counts
reconcile: ``seen = imported + skipped_existing + quarantined``.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import codecs
import collections
import io
import json
import pickle
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

try:  # numpy >= 2 keeps the array-rebuilding helpers in numpy._core; 1.x in numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

from .spec import UNIFORM_SUFFIX, FeatureSpec, InvalidRegionFeatures, RegionFeatures
from .store import FeatureStoreWriter, atomic_write_bytes, atomic_write_table

FORMATS = ("tsv", "lmdb", "hdf5")
BOTTOM_UP_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
QUARANTINE_SCHEMA = pa.schema(
    [("source", pa.string()), ("row_id", pa.string()), ("image_id", pa.string()), ("code", pa.string()),
     ("reason", pa.string())]
)  # fmt: skip
_ALIASES = {"bbox": "boxes", "image_height": "image_h", "image_width": "image_w", "img_h": "image_h",
            "img_w": "image_w", "img_id": "image_id"}  # fmt: skip  # vilbert-multi-task / LXMERT names


class MissingClassProbs(ValueError):
    """The source has no class probabilities and uniform placeholders were not allowed."""


@dataclass(frozen=True)
class ImportConfig:
    """One import: which files, which format, which store, and the spec the records must meet."""

    sources: tuple[str, ...]
    """Input files (TSV parts / HDF5 files) or the LMDB directory, read in this order."""
    fmt: str
    """One of ``tsv``, ``lmdb``, ``hdf5``."""
    store_root: str
    """Local folder of the feature store (created, or resumed when it exists with the same spec)."""
    feature_size: int = 2048
    """D; records with another width are quarantined (bottom-up ResNet-101: 2048)."""
    num_classes: int = 1601
    """C; the class-distribution width (Visual Genome detector: 1601)."""
    min_boxes: int = 1
    """Fewest regions per image; fewer is quarantined."""
    max_boxes: int = 100
    """Most regions per image; more is quarantined (bottom-up adaptive: 10-100)."""
    weights_sha256: str | None = None
    """sha256 of the detector weights that made the features, when known."""
    allow_uniform_class_probs: bool = False
    """Accept a source without class probabilities, storing a uniform distribution (marked in the spec)."""
    tsv_fields: tuple[str, ...] | None = None
    """TSV column names in order (unknown names are ignored); None: bottom-up's 6 or 7 columns."""
    quarantine_path: str | None = None
    """Where rejected records go; default ``<store>/quarantine.parquet`` (``quarantine-<part>`` with a part)."""
    shard_bytes: int = 256 * 2**20
    """Shard size threshold of the store writer."""
    part: str | None = None
    """Writer part name when several imports fill one store at once (then call ``merge_index``)."""

    def __post_init__(self) -> None:
        if isinstance(self.sources, str | Path) or not self.sources:
            raise ValueError("ImportConfig.sources must be a non-empty sequence of paths")
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        if self.fmt not in FORMATS:
            raise ValueError(f"ImportConfig.fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.tsv_fields is not None and not {"image_id", "boxes", "features"} <= set(self.tsv_fields):
            raise ValueError("ImportConfig.tsv_fields must name at least image_id, boxes and features")
        self.spec(uniform=False)  # validates the sizes now, not after reading the source

    def spec(self, uniform: bool) -> FeatureSpec:
        """The store's spec; ``uniform`` marks placeholder class probabilities in the backend name."""
        backend = f"import:{self.fmt}" + (UNIFORM_SUFFIX if uniform else "")
        return FeatureSpec(
            backend, self.weights_sha256, self.feature_size, self.num_classes, self.min_boxes, self.max_boxes
        )


@dataclass
class ImportResult:
    """What an import did; ``seen == imported + skipped_existing + quarantined``."""

    store_root: str
    quarantine_path: str
    spec: dict[str, Any]
    seen: int = 0
    imported: int = 0
    skipped_existing: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RawRecord:
    """One source record before decoding: arrays may still be base64 text or numpy arrays."""

    source: str
    row_id: str
    image_id: str | None
    fields: dict[str, Any] | None
    error: str | None = None  # "code: detail" when the record could not be parsed at all


# --- the restricted unpickler -------------------------------------------------------------------------------------

_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles carry bytes through it
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool"):
    _SAFE_GLOBALS[("builtins", _name)] = getattr(builtins, _name)
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x module names, both mapped to what we have
    _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _multiarray.scalar
    _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _numeric._frombuffer  # type: ignore[attr-defined]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (it could run code when loaded)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"global {module}.{name} is not allowed") from None


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` allowing only builtin containers/scalars, OrderedDict and numpy arrays/scalars.

    Pickles can run arbitrary code when loaded; this refuses every other global (:class:`UnsafePickleError`).
    """
    return _RestrictedUnpickler(io.BytesIO(data)).load()


# --- readers: source -> RawRecord ---------------------------------------------------------------------------------


def _read_tsv(config: ImportConfig) -> Iterator[RawRecord]:
    for path in map(Path, config.sources):
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip(b"\r\n")
                if not line:
                    continue
                parts = line.split(b"\t")
                names = config.tsv_fields or {6: BOTTOM_UP_FIELDS, 7: (*BOTTOM_UP_FIELDS, "cls_prob")}.get(len(parts))
                row = f"line {lineno}"
                if names is None or len(names) != len(parts):
                    yield RawRecord(str(path), row, None, None, f"bad_field_count: {len(parts)} tab-separated fields")
                    continue
                values: dict[str, Any] = dict(zip(names, parts, strict=True))
                try:
                    image_id = values.pop("image_id").decode("utf-8")
                except UnicodeDecodeError:
                    yield RawRecord(str(path), row, None, None, "bad_id: image_id is not UTF-8")
                    continue
                yield RawRecord(str(path), row, image_id, values)


def _read_lmdb(config: ImportConfig) -> Iterator[RawRecord]:
    import lmdb

    for source in config.sources:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"LMDB not found: {path}")
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=path.is_dir())  # sequential scan: readahead on
        try:
            with env.begin(buffers=False) as txn:
                keys_blob = txn.get(b"keys")
                try:
                    listed = [] if keys_blob is None else safe_loads(keys_blob)
                except Exception as exc:
                    raise ValueError(f"{path}: cannot read the 'keys' entry: {exc}") from exc
                if not isinstance(listed, list):
                    raise ValueError(f"{path}: the 'keys' entry is not a pickled list")
                present = set()
                for key, value in txn.cursor():
                    if key == b"keys":
                        continue
                    present.add(key)
                    yield _lmdb_record(source, key, value)
                for key in listed:  # listed keys are what ViLBERT's reader would try to load
                    key = key if isinstance(key, bytes) else str(key).encode()
                    if key not in present:
                        image_id = key.decode("utf-8", "replace")
                        yield RawRecord(source, f"key {key!r}", image_id, None, "missing_value: listed, no entry")
        finally:
            env.close()


def _lmdb_record(source: str, key: bytes, value: bytes) -> RawRecord:
    row = f"key {key!r}"
    try:
        image_id = key.decode("utf-8")  # the key, not item["image_id"]: it is what ViLBERT looks images up by
    except UnicodeDecodeError:
        return RawRecord(source, row, None, None, "bad_id: key is not UTF-8")
    try:
        item = safe_loads(value)
    except UnsafePickleError as exc:
        return RawRecord(source, row, image_id, None, f"unsafe_pickle: {exc}")
    except Exception as exc:  # truncated or garbled bytes raise many types
        return RawRecord(source, row, image_id, None, f"decode_error: not a readable pickle ({exc!r})")
    if not isinstance(item, Mapping):
        return RawRecord(source, row, image_id, None, f"bad_record: value is a {type(item).__name__}, not a dict")
    values = {_ALIASES.get(k, k): v for k, v in item.items() if isinstance(k, str)}
    values.pop("image_id", None)
    return RawRecord(source, row, image_id, values)


def _read_hdf5(config: ImportConfig) -> Iterator[RawRecord]:
    import h5py

    for source in config.sources:
        with h5py.File(source, "r") as f:
            if isinstance(f.get("features"), h5py.Dataset):
                yield from _hdf5_flat(source, f)
            else:
                for name, group in f.items():
                    if not isinstance(group, h5py.Group):
                        raise ValueError(f"{source}: /{name} is neither the flat layout nor an image group")
                    values = {_ALIASES.get(k, k): v[()] for k, v in group.items()}
                    values.update({_ALIASES.get(k, k): v for k, v in group.attrs.items()})
                    yield RawRecord(source, f"/{name}", name, values)


def _hdf5_flat(source: str, f: Any) -> Iterator[RawRecord]:
    missing = [n for n in ("image_id", "boxes", "image_w", "image_h") if n not in f]
    if missing:
        raise ValueError(f"{source}: flat HDF5 layout needs datasets {missing}")
    ids, widths, heights = f["image_id"][()], f["image_w"][()], f["image_h"][()]
    counts = f["num_boxes"][()] if "num_boxes" in f else None
    has_cls = "cls_prob" in f
    for i, raw_id in enumerate(ids):
        image_id = raw_id.decode("utf-8", "replace") if isinstance(raw_id, bytes) else str(raw_id)
        n = int(counts[i]) if counts is not None else f["features"].shape[1]
        if not 0 <= n <= f["features"].shape[1]:
            yield RawRecord(source, f"row {i}", image_id, None, f"box_count: num_boxes {n} outside the padded K")
            continue
        values = {"image_w": widths[i], "image_h": heights[i], "num_boxes": n}
        values.update(boxes=f["boxes"][i, :n], features=f["features"][i, :n])
        if has_cls:
            values["cls_prob"] = f["cls_prob"][i, :n]
        yield RawRecord(source, f"row {i}", image_id, values)


_READERS = {"tsv": _read_tsv, "lmdb": _read_lmdb, "hdf5": _read_hdf5}


# --- decoding: RawRecord -> RegionFeatures ------------------------------------------------------------------------


def _int_field(values: dict[str, Any], name: str) -> int:
    value = values.get(name)
    try:
        if isinstance(value, bytes | str):
            return int(value)
        number = float(np.asarray(value).reshape(()))
        if number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError):
        raise InvalidRegionFeatures("bad_field", f"{name} is not an integer: {value!r:.40}") from None


def _float_array(values: dict[str, Any], name: str, cols: int, rows: int | None) -> np.ndarray:
    value = values.get(name)
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value)
        if text[:2] == b"b'" and text[-1:] == b"'":  # Python 3 csv.writer around bytes
            text = text[2:-1]
        try:
            value = np.frombuffer(base64.b64decode(text, validate=True), "<f4")
        except (binascii.Error, ValueError) as exc:
            raise InvalidRegionFeatures("decode_error", f"{name} is not base64 of float32 ({exc})") from None
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
        raise InvalidRegionFeatures("bad_field", f"{name} is missing or not a float array")
    rows = value.size // cols if rows is None else rows
    if value.size != rows * cols:
        raise InvalidRegionFeatures("wrong_shape", f"{name} has {value.size} values, expected {rows} x {cols}")
    return value.reshape(rows, cols)


def decode_record(raw: RawRecord, spec: FeatureSpec) -> RegionFeatures:
    """Turn one source record into :class:`RegionFeatures` (not yet validated against the spec)."""
    assert raw.fields is not None and raw.image_id is not None
    values = raw.fields
    rows = _int_field(values, "num_boxes") if "num_boxes" in values else None
    features = _float_array(values, "features", spec.feature_size, rows)
    rows = features.shape[0]
    boxes = _float_array(values, "boxes", 4, rows)
    if spec.uniform_class_probs:
        class_probs = np.full((rows, spec.num_classes), 1.0 / spec.num_classes, np.float32)
    elif "cls_prob" in values:
        class_probs = _float_array(values, "cls_prob", spec.num_classes, rows)
    else:
        raise InvalidRegionFeatures("missing_class_probs", "record has no cls_prob")
    w, h = _int_field(values, "image_w"), _int_field(values, "image_h")
    return RegionFeatures(raw.image_id, boxes, features, class_probs, w, h)


# --- the import ---------------------------------------------------------------------------------------------------


def run_import(config: ImportConfig) -> ImportResult:
    """Import ``config.sources`` into the store; rejected records go to the quarantine file with their reason."""
    started = time.perf_counter()
    records = iter(_READERS[config.fmt](config))
    head: list[RawRecord] = []
    for raw in records:  # the first parseable record says whether the source has class probabilities
        head.append(raw)
        if raw.fields is not None:
            break
    has_cls = not head or head[-1].fields is None or "cls_prob" in head[-1].fields
    if not has_cls and not config.allow_uniform_class_probs:
        raise MissingClassProbs(
            f"{config.sources[0]} has no class probabilities (cls_prob); masked-region pretraining needs them. "
            "Pass allow_uniform_class_probs=True to store a uniform placeholder (marked in the spec)."
        )
    spec = config.spec(uniform=not has_cls)
    root = Path(config.store_root)
    suffix = "" if config.part is None else f"-{config.part}"
    qpath = Path(config.quarantine_path or root / f"quarantine{suffix}.parquet")
    result = ImportResult(str(root), str(qpath), spec.to_dict())
    rejected: dict[str, list] = {name: [] for name in QUARANTINE_SCHEMA.names}
    first_seen: dict[str, str] = {}

    def reject(raw: RawRecord, reason: str) -> None:
        code = reason.split(":", 1)[0]
        row = (raw.source, raw.row_id, raw.image_id, code, reason)
        for name, value in zip(QUARANTINE_SCHEMA.names, row, strict=True):
            rejected[name].append(value)
        result.quarantined += 1
        result.reasons[code] = result.reasons.get(code, 0) + 1

    with FeatureStoreWriter(root, spec, shard_bytes=config.shard_bytes, resume=True, part=config.part) as writer:
        try:
            for raw in chain(head, records):
                result.seen += 1
                if raw.error is not None or raw.image_id is None:
                    reject(raw, raw.error or "bad_id: no image id")
                    continue
                if raw.image_id in first_seen:
                    reject(raw, f"duplicate_id: image {raw.image_id!r} also at {first_seen[raw.image_id]}")
                    continue
                first_seen[raw.image_id] = f"{raw.source}:{raw.row_id}"
                if raw.image_id in writer:  # stored by an earlier (possibly interrupted) run
                    result.skipped_existing += 1
                    continue
                try:
                    writer.add(decode_record(raw, spec))
                except InvalidRegionFeatures as exc:
                    reject(raw, str(exc))
                    continue
                result.imported += 1
        finally:  # even when the import stops half-way, what was rejected so far is kept with its reason
            qpath.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_table(qpath, pa.Table.from_pydict(rejected, schema=QUARANTINE_SCHEMA))
            result.seconds = time.perf_counter() - started
            report = json.dumps({**asdict(result), "sources": list(config.sources), "format": config.fmt}, indent=2)
            atomic_write_bytes(root / f"import_report{suffix}.json", lambda f: f.write(report.encode() + b"\n"))
    assert result.seen == result.imported + result.skipped_existing + result.quarantined
    return result


def import_features(
    source_path: str | Path | Sequence[str | Path], fmt: str, store_root: str | Path, **overrides: Any
) -> ImportResult:
    """Import features from ``source_path`` (one path or several) in format ``fmt`` into ``store_root``.

    ``overrides`` are :class:`ImportConfig` fields (``feature_size``, ``num_classes``, ``max_boxes``,
    ``allow_uniform_class_probs``, ``quarantine_path``, ...).
    """
    sources = [source_path] if isinstance(source_path, str | Path) else list(source_path)
    return run_import(ImportConfig(tuple(str(s) for s in sources), fmt, str(store_root), **overrides))
