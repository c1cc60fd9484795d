"""A plain folder of images with an index: ``captions.csv`` or ``captions.jsonl`` (local or S3).

Index columns / keys: ``image`` (path relative to the folder; also accepted: ``file``, ``image_file``,
``file_name``, ``filename``), ``caption``, and optionally ``split``, ``image_id`` and ``caption_id``.
One row per caption; an image with several captions appears on several rows.  When two files get the
same image id, the first keeps it; the second image and its captions are reported as ``duplicate_image_id``.  Without ``image_id`` the
id is the relative path without extension, with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``;
without ``caption_id`` it is ``<image_id>-c<n>`` (n counts that image's captions from 0, in file order).

Only images named in the index are read.  Index text is decoded as UTF-8 with invalid bytes kept as
escapes, so a caption that is not UTF-8 reaches ingest (which quarantines it) instead of failing the file.
Files under ``annotations/`` and ``tasks/`` and the index itself are the source's native files.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from components import storage
from components.sources import (
    ImageRef,
    SourceFormatError,
    decode_text,
    id_from_path,
    is_utf8,
    normalize_split,
    read_image_refs,
)
from components.sources.base import SourceCaption, SourceFiles, SourceImage, SourceProblem

IMAGE_KEYS = ("image", "file", "image_file", "file_name", "filename")


class FolderSource:
    """Images in a folder (local or ``s3://``) indexed by ``captions.csv`` or ``captions.jsonl``."""

    def __init__(self, root: str, captions_file: str = "captions.csv", uri: str | None = None, workers: int = 8):
        self.root = root.rstrip("/") if storage.is_s3(root) else root
        self.captions_file = captions_file
        self.uri = uri or root
        self.workers = workers
        self._rows: list[tuple[int, dict[str, Any]] | SourceProblem] | None = None

    def _index_uri(self) -> str:
        return storage.join(self.root, self.captions_file)

    def rows(self) -> list[tuple[int, dict[str, Any]] | SourceProblem]:
        """The index rows as ``(row number, fields)``, or a problem for rows that cannot be parsed."""
        if self._rows is None:
            text = decode_text(storage.read_bytes(self._index_uri()))
            parse = self._parse_jsonl if self.captions_file.endswith(".jsonl") else self._parse_csv
            self._rows = list(parse(text))
        return self._rows

    def _parse_csv(self, text: str) -> Iterator[tuple[int, dict[str, Any]] | SourceProblem]:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [f.strip() for f in reader.fieldnames or []]
        reader.fieldnames = fields
        if "caption" not in fields or not any(k in fields for k in IMAGE_KEYS):
            raise SourceFormatError(
                f"{self._index_uri()}: the header must name an image column ({', '.join(IMAGE_KEYS)}) and 'caption'; "
                f"found {fields}"
            )
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                yield SourceProblem(f"row {line}", "bad_row", f"{self._index_uri()}:{line}: wrong number of fields")
                continue
            yield line, row

    def _parse_jsonl(self, text: str) -> Iterator[tuple[int, dict[str, Any]] | SourceProblem]:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self._index_uri()}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield SourceProblem(f"row {line_no}", "bad_row", f"{where}: not JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                yield SourceProblem(f"row {line_no}", "bad_row", f"{where}: not a JSON object")
                continue
            yield line_no, row

    def _entries(self) -> Iterator[tuple[int, ImageRef, Any, str | None] | SourceProblem]:
        """Per row: (row number, image ref, caption, explicit caption id) or the row's problem."""
        for item in self.rows():
            if isinstance(item, SourceProblem):
                yield item
                continue
            line, row = item
            rel = next((row[k] for k in IMAGE_KEYS if row.get(k) not in (None, "")), None)
            where = f"{self._index_uri()}:{line}"
            if not isinstance(rel, str) or not is_utf8(rel):
                yield SourceProblem(f"row {line}", "bad_row", f"{where}: no usable image path")
                continue
            image_id = str(row.get("image_id") or "").strip() or id_from_path(rel.strip())
            split = normalize_split(str(row.get("split") or ""))
            caption_id = str(row["caption_id"]).strip() if row.get("caption_id") not in (None, "") else None
            yield line, ImageRef(image_id, rel.strip(), split), row.get("caption"), caption_id

    def images(self) -> Iterator[SourceImage | SourceProblem]:
        """Each image named in the index, once per (image id, path) pair, in index order."""
        seen: set[tuple[str, str]] = set()
        refs: list[ImageRef] = []
        for entry in self._entries():
            if isinstance(entry, SourceProblem):
                continue  # reported once, by captions(): the row is a caption row
            ref = entry[1]
            if (ref.image_id, ref.rel) not in seen:
                seen.add((ref.image_id, ref.rel))
                refs.append(ref)
        return read_image_refs(self.root, refs, self.workers)

    def captions(self) -> Iterator[SourceCaption | SourceProblem]:
        """One caption per index row (problems for rows that cannot be parsed)."""
        counts: dict[str, int] = {}
        first_path: dict[str, str] = {}
        for entry in self._entries():
            if isinstance(entry, SourceProblem):
                yield entry
                continue
            line, ref, caption, caption_id = entry
            n = counts.get(ref.image_id, 0)
            counts[ref.image_id] = n + 1
            where = f"{self._index_uri()}:{line}"
            if first_path.setdefault(ref.image_id, ref.rel) != ref.rel:
                # Another file already has this image id: this caption describes the rejected duplicate.
                why = f"{where}: {ref.rel} has the image id {ref.image_id!r} of {first_path[ref.image_id]}"
                yield SourceProblem(caption_id or f"{ref.image_id}-c{n}", "duplicate_image_id", why)
                continue
            if not isinstance(caption, str):
                yield SourceProblem(caption_id or f"row {line}", "bad_row", f"{where}: caption is not text")
                continue
            yield SourceCaption(caption_id or f"{ref.image_id}-c{n}", ref.image_id, caption, ref.split)

    def native_files(self) -> SourceFiles:
        """The index (as ``annotations/<name>``) and any files under ``annotations/`` and ``tasks/``."""
        files = {
            PurePosixPath("annotations", posixpath.basename(self.captions_file)): storage.read_bytes(self._index_uri())
        }
        for folder in ("annotations", "tasks"):
            prefix = storage.join(self.root, folder)
            for rel in storage.list_files(prefix):
                if not storage.has_symlink(prefix, rel):  # never follow links out of the source
                    files[PurePosixPath(folder, rel)] = storage.read_bytes(storage.join(prefix, rel))
        return SourceFiles(files)
