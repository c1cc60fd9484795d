"""Data sources: :func:`open_source` picks the reader for a source URI.

Rules, in order (the first that applies wins):

1. ``synthetic://<world>?seed=..&n=..`` -> :class:`components.sources.synthetic.SyntheticSource`.
2. A local path or ``s3://bucket/prefix`` naming a FILE is read by its name:
   ``captions.csv`` / ``captions.jsonl`` -> folder reader (root = its folder);
   ``captions_<name>.json`` -> COCO captions reader (root = its folder, or the folder above when that
   folder is called ``annotations``); ``*.tsv`` -> Conceptual Captions reader (images under ``<folder>/images``).
3. A FOLDER (local or S3 prefix) is read by what it holds directly (and in ``annotations/`` for COCO):
   ``captions.csv`` or ``captions.jsonl`` -> folder reader; ``captions_*.json`` -> COCO reader;
   ``*.tsv`` -> Conceptual Captions reader.  Exactly one kind must be present; none or several is an
   error that names the files found (point the URI at one file to choose).

Readers never drop a row silently: what they cannot read becomes a
:class:`~components.sources.base.SourceProblem` with a reason, which ingest quarantines.  A split of
``""`` means "the source has none"; ingest then assigns one by a hash of the image id.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from components import storage
from components.sources.base import Source, SourceImage, SourceProblem

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


class SourceFormatError(ValueError):
    """The source as a whole cannot be read (unknown layout, missing required column, unreadable index)."""


def normalize_split(text: str | None) -> str:
    """``"Validation"`` -> ``"val"``; empty or None -> ``""`` (no split); unknown names are returned as is."""
    text = (text or "").strip()
    return _SPLIT_ALIASES.get(text.lower(), text)


def split_from_name(name: str) -> str:
    """Split named in a file name (``captions_val2014.json`` -> ``val``, ``Train_GCC-training.tsv`` -> ``train``)."""
    words = re.split(r"[^a-z]+", name.lower())
    for word in words:
        if word in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[word]
    return ""


def decode_text(data: bytes) -> str:
    """UTF-8 (BOM dropped) with undecodable bytes kept as surrogate escapes, so one bad row spoils only itself."""
    return data.decode("utf-8-sig", errors="surrogateescape")


def is_utf8(text: str) -> bool:
    """False for text that holds surrogate escapes of bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def id_from_path(rel: str) -> str:
    """An image id from a relative path: the path without extension, other characters than ``[A-Za-z0-9._-]``
    replaced by ``_`` (``photos/a cat.jpg`` -> ``photos_a_cat``)."""
    stem = posixpath.splitext(rel)[0]
    return _SAFE_ID.sub("_", stem).strip("_.") or "image"


@dataclass(frozen=True)
class ImageRef:
    """An image a reader wants read: id, path relative to ``root``, split."""

    image_id: str
    rel: str
    split: str


def read_image_refs(root: str, refs: Iterable[ImageRef], workers: int = 8) -> Iterator[SourceImage | SourceProblem]:
    """Read the referenced files concurrently (in order), refusing paths outside ``root`` and symbolic links.

    Reasons: ``path_escapes_root``, ``symlink``, ``missing_file``, ``read_error``.
    """

    def load(ref: ImageRef) -> SourceImage | SourceProblem:
        where = storage.join(root, ref.rel)
        try:
            uri = storage.child(root, ref.rel)
            if storage.has_symlink(root, ref.rel):
                return SourceProblem(ref.image_id, "symlink", where)
            data = storage.read_bytes(uri)
        except storage.UnsafePath:
            return SourceProblem(ref.image_id, "path_escapes_root", where)
        except (FileNotFoundError, IsADirectoryError):
            return SourceProblem(ref.image_id, "missing_file", where)
        except Exception as exc:  # any other read failure is this row's problem, not the whole run's
            return SourceProblem(ref.image_id, "read_error", f"{where}: {exc}")
        return SourceImage(ref.image_id, data, ref.split, uri, posixpath.basename(ref.rel))

    return storage.map_ordered(load, refs, workers)


def _is_file(uri: str) -> bool:
    if storage.is_s3(uri):
        _, key = storage.split_s3(uri)
        return bool(key) and not key.endswith("/") and storage.exists(uri)
    from pathlib import Path

    return Path(uri).is_file()


def _parent(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    from pathlib import Path

    return str(Path(uri).parent)


def _kind_of_file(name: str) -> str | None:
    if name in ("captions.csv", "captions.jsonl"):
        return "folder"
    if re.fullmatch(r"captions_.+\.json", name):
        return "coco"
    if name.lower().endswith(".tsv"):
        return "cc"
    return None


def open_source(uri: str, workers: int = 8) -> Source:
    """The reader for ``uri`` (see the module docstring for the rules).  ``workers``: concurrent file reads."""
    from components.sources.coco import CocoSource
    from components.sources.conceptual_captions import ConceptualCaptionsSource
    from components.sources.folder import FolderSource

    if uri.startswith("synthetic://"):
        from components.sources.synthetic import SyntheticSource

        return SyntheticSource(uri)
    if "://" in uri and not storage.is_s3(uri):
        raise SourceFormatError(f"unsupported source URI scheme: {uri} (use synthetic://, s3:// or a local path)")
    if _is_file(uri):
        name = posixpath.basename(uri.rstrip("/"))
        kind, folder = _kind_of_file(name), _parent(uri)
        if kind == "folder":
            return FolderSource(folder, captions_file=name, uri=uri, workers=workers)
        if kind == "coco":
            root = _parent(folder) if posixpath.basename(folder.rstrip("/")) == "annotations" else folder
            return CocoSource(root, caption_files=[uri], uri=uri, workers=workers)
        if kind == "cc":
            return ConceptualCaptionsSource([uri], storage.join(folder, "images"), uri=uri, workers=workers)
        raise SourceFormatError(
            f"cannot tell the format of {uri}: expected captions.csv/.jsonl, captions_*.json or *.tsv"
        )
    names = storage.list_dir(uri)
    annotations = storage.list_dir(storage.join(uri, "annotations"))
    if not names and not annotations and not storage.exists(uri) and not any(storage.list_files(uri)):
        raise storage.ObjectNotFound(f"source {uri} does not exist or is empty")
    found = {
        "folder": [n for n in names if _kind_of_file(n) == "folder"],
        "coco": [n for n in names if _kind_of_file(n) == "coco"]
        + [f"annotations/{n}" for n in annotations if _kind_of_file(n) == "coco"],
        "cc": [n for n in names if _kind_of_file(n) == "cc"],
    }
    kinds = [k for k, files in found.items() if files]
    if len(kinds) != 1:
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in found.items() if v) or f"files: {', '.join(names[:10])}"
        problem = "several source layouts match" if kinds else "no known source layout"
        raise SourceFormatError(
            f"{problem} in {uri} ({what}). Expected one of captions.csv/captions.jsonl (folder), "
            "captions_<split>.json (COCO) or *.tsv (Conceptual Captions); point the URI at one file to choose."
        )
    kind = kinds[0]
    if kind == "folder":
        return FolderSource(uri, captions_file=found["folder"][0], workers=workers)
    if kind == "coco":
        return CocoSource(uri, caption_files=[storage.join(uri, f) for f in found["coco"]], workers=workers)
    return ConceptualCaptionsSource(
        [storage.join(uri, f) for f in found["cc"]], storage.join(uri, "images"), uri=uri, workers=workers
    )
