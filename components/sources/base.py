"""What every data source yields, and how a source URI picks its reader.

A source is read as a stream of :class:`SourceImage` (image bytes plus where they came from) and
:class:`SourceCaption` rows, plus optional native annotation / task files (copied verbatim by ingest).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Protocol


@dataclass(frozen=True)
class SourceImage:
    image_id: str
    """Unique, stable id within the source."""
    data: bytes
    """The encoded image file, exactly as stored at the source (never re-encoded)."""
    split: str
    """train, val or test."""
    origin: str
    """Where the bytes came from (path, s3://..., synthetic://...), for reports."""
    filename_hint: str | None = None
    """Original file name, if any (used only to pick a file extension)."""


@dataclass(frozen=True)
class SourceCaption:
    caption_id: str
    image_id: str
    caption: str
    split: str


@dataclass(frozen=True)
class SourceProblem:
    """A row the reader could not turn into an image or caption; ingest quarantines it with the reason."""

    row_id: str
    reason: str
    origin: str


@dataclass
class SourceFiles:
    """Native files to place under the dataset root: relative path -> bytes (annotations/, tasks/)."""

    files: dict[PurePosixPath, bytes] = field(default_factory=dict)


class Source(Protocol):
    """A readable data source.  ``uri`` identifies it in manifests and reports."""

    uri: str

    def images(self) -> Iterator[SourceImage | SourceProblem]: ...

    def captions(self) -> Iterator[SourceCaption | SourceProblem]: ...

    def native_files(self) -> SourceFiles: ...
