"""COCO captions (``captions_train2014.json`` style), local or on S3.

A captions file holds ``images`` (``id``, ``file_name``, ...) and ``annotations`` (``id``, ``image_id``,
``caption``).  For ``captions_<name>.json`` the split comes from ``<name>`` (``train2014`` -> train,
``val2014`` -> val, ``test...`` -> test; otherwise ingest assigns one) and images are looked up in the
first of ``<root>/<name>/``, ``<root>/images/<name>/``, ``<root>/images/``, ``<root>/`` that holds the
first listed image (the official layout is ``annotations/`` next to ``train2014/``, ``val2014/``).
Image ids are COCO's numeric ids as text; caption ids are the annotation ids as text.
Native files: each captions file, and ``instances_<name>.json`` when it lies next to it, copied to
``annotations/``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from components import storage
from components.sources import ImageRef, SourceFormatError, decode_text, read_image_refs, split_from_name
from components.sources.base import SourceCaption, SourceFiles, SourceImage, SourceProblem


def _name(uri: str) -> str:
    """``.../captions_train2014.json`` -> ``train2014``."""
    base = posixpath.basename(uri)
    return base[len("captions_") : -len(".json")] if base.startswith("captions_") else posixpath.splitext(base)[0]


class CocoSource:
    """One or more COCO captions files below ``root`` (local or ``s3://``)."""

    def __init__(self, root: str, caption_files: list[str], uri: str | None = None, workers: int = 8):
        if not caption_files:
            raise SourceFormatError(f"no captions_*.json given for COCO source {root}")
        self.root = root.rstrip("/") if storage.is_s3(root) else root
        self.caption_files = list(caption_files)
        self.uri = uri or root
        self.workers = workers
        self._docs: dict[str, dict[str, Any]] = {}

    def _doc(self, file_uri: str) -> dict[str, Any]:
        if file_uri not in self._docs:
            try:
                doc = json.loads(decode_text(storage.read_bytes(file_uri)))
            except json.JSONDecodeError as exc:
                raise SourceFormatError(f"{file_uri} is not valid JSON: {exc}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
                raise SourceFormatError(f"{file_uri} is not a COCO captions file (no 'images' list)")
            if not isinstance(doc.get("annotations", []), list):
                raise SourceFormatError(f"{file_uri}: 'annotations' is not a list")
            self._docs[file_uri] = doc
        return self._docs[file_uri]

    def _image_dir(self, name: str, file_names: list[str]) -> str:
        """The folder (relative to root) that holds this file's images; see the module docstring."""
        candidates = [name, f"images/{name}", "images", ""]
        for sample in file_names[:1]:
            for cand in candidates:
                try:
                    if storage.exists(storage.child(self.root, posixpath.join(cand, sample))):
                        return cand
                except storage.UnsafePath:
                    break  # the file name itself escapes: every candidate would; the reader reports it per image
        return name

    def images(self) -> Iterator[SourceImage | SourceProblem]:
        """Every entry of every file's ``images`` list, read from the image folder."""
        for file_uri in self.caption_files:
            doc, name = self._doc(file_uri), _name(file_uri)
            split = split_from_name(name)
            refs, problems = [], []
            for n, entry in enumerate(doc["images"]):
                ok = isinstance(entry, dict) and entry.get("id") is not None and isinstance(entry.get("file_name"), str)
                if not ok:
                    problems.append(
                        SourceProblem(f"images[{n}]", "bad_row", f"{file_uri}: images[{n}] lacks id/file_name")
                    )
                    continue
                refs.append(ImageRef(str(entry["id"]), entry["file_name"], split))
            yield from problems
            folder = self._image_dir(name, [r.rel for r in refs])
            refs = [ImageRef(r.image_id, posixpath.join(folder, r.rel) if folder else r.rel, r.split) for r in refs]
            yield from read_image_refs(self.root, refs, self.workers)

    def captions(self) -> Iterator[SourceCaption | SourceProblem]:
        """Every entry of every file's ``annotations`` list."""
        for file_uri in self.caption_files:
            doc = self._doc(file_uri)
            split = split_from_name(_name(file_uri))
            for n, ann in enumerate(doc.get("annotations", [])):
                ok = isinstance(ann, dict) and ann.get("id") is not None and ann.get("image_id") is not None
                if not ok or not isinstance(ann.get("caption"), str):
                    row = (
                        str(ann.get("id"))
                        if isinstance(ann, dict) and ann.get("id") is not None
                        else f"annotations[{n}]"
                    )
                    yield SourceProblem(row, "bad_row", f"{file_uri}: annotations[{n}] lacks id/image_id/caption text")
                    continue
                yield SourceCaption(str(ann["id"]), str(ann["image_id"]), ann["caption"], split)

    def native_files(self) -> SourceFiles:
        """The captions files and their sibling ``instances_<name>.json``, under ``annotations/``."""
        files: dict[PurePosixPath, bytes] = {}
        for file_uri in self.caption_files:
            files[PurePosixPath("annotations", posixpath.basename(file_uri))] = storage.read_bytes(file_uri)
            folder = file_uri.rsplit("/", 1)[0] if storage.is_s3(file_uri) else str(PurePosixPath(file_uri).parent)
            instances = f"instances_{_name(file_uri)}.json"
            if instances in storage.list_dir(folder):
                files[PurePosixPath("annotations", instances)] = storage.read_bytes(storage.join(folder, instances))
        return SourceFiles(files)
