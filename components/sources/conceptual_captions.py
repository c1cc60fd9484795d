"""Conceptual Captions TSV (``caption<TAB>url`` per line, no header, as distributed), local or on S3.

The TSV names images by URL.  An :class:`ImageFetcher` turns URLs into bytes; the default,
:class:`LocalImageFetcher`, finds already-downloaded files in an images folder (local or S3) by this
convention:

* if the folder holds ``url_map.tsv`` (``url<TAB>relative file`` per line), that mapping is used;
* otherwise the file for a URL is ``<sha1(url) hex>`` plus any extension (``.jpg``, ``.png``, ...),
  directly in the folder or below it.

:class:`HttpImageFetcher` is the interface for downloading from the web; this environment has no
network, so it refuses with :class:`FetchUnavailable`.

Image ids are ``cc-`` + the first 16 hex digits of sha1(url); a URL listed twice is one image with two
captions.  Caption ids are ``<tsv file stem>-<line number>``.  The split comes from the TSV file name
(``Train_GCC-training.tsv`` -> train, ``Validation_GCC-1.1.0-Validation.tsv`` -> val).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from components import storage
from components.sources import ImageRef, decode_text, is_utf8, read_image_refs, split_from_name
from components.sources.base import SourceCaption, SourceFiles, SourceImage, SourceProblem

URL_MAP_FILE = "url_map.tsv"


class FetchUnavailable(RuntimeError):
    """The fetcher cannot work here (e.g. downloading needs a network this environment lacks)."""


def url_sha1(url: str) -> str:
    """The hex sha1 of a URL (UTF-8): the default image file name for it."""
    return hashlib.sha1(url.encode("utf-8"), usedforsecurity=False).hexdigest()


def image_id_for(url: str) -> str:
    """The stable image id of a URL."""
    return "cc-" + url_sha1(url)[:16]


@dataclass(frozen=True)
class UrlImage:
    """An image the TSV asks for: its id, URL and split."""

    image_id: str
    url: str
    split: str


class ImageFetcher(Protocol):
    """Turns the TSV's URLs into image bytes (or a problem per URL), in input order."""

    def fetch(self, images: Iterable[UrlImage]) -> Iterator[SourceImage | SourceProblem]: ...


class LocalImageFetcher:
    """Finds already-downloaded images in ``images_root`` (local or S3) by the module's convention."""

    def __init__(self, images_root: str, workers: int = 8):
        self.images_root = images_root
        self.workers = workers

    def _index(self) -> tuple[bool, dict[str, str]]:
        """(keyed by URL?, URL or sha1 of the URL -> file path relative to the images folder)."""
        if URL_MAP_FILE in storage.list_dir(self.images_root):
            text = decode_text(storage.read_bytes(storage.join(self.images_root, URL_MAP_FILE)))
            pairs = (line.split("\t") for line in text.splitlines() if line.strip())
            return True, {p[0].strip(): p[1].strip() for p in pairs if len(p) == 2}
        index: dict[str, str] = {}
        for rel in storage.list_files(self.images_root):
            stem = posixpath.splitext(posixpath.basename(rel))[0]
            index.setdefault(stem, rel)
        return False, index

    def fetch(self, images: Iterable[UrlImage]) -> Iterator[SourceImage | SourceProblem]:
        by_url, index = self._index()
        refs: list[ImageRef] = []
        missing: dict[str, SourceProblem] = {}
        for img in images:
            rel = index.get(img.url if by_url else url_sha1(img.url))
            if rel is None:
                where = f"{self.images_root} ({'url_map.tsv' if by_url else 'sha1 ' + url_sha1(img.url)}) for {img.url}"
                missing[img.image_id] = SourceProblem(img.image_id, "missing_file", where)
                refs.append(ImageRef(img.image_id, "", img.split))  # placeholder keeps the order
            else:
                refs.append(ImageRef(img.image_id, rel, img.split))
        found = read_image_refs(self.images_root, [r for r in refs if r.rel], self.workers)
        for ref in refs:
            yield missing[ref.image_id] if not ref.rel else next(found)


class HttpImageFetcher:
    """Downloads images by URL.  Not available here: this environment has no network access."""

    def fetch(self, images: Iterable[UrlImage]) -> Iterator[SourceImage | SourceProblem]:
        raise FetchUnavailable(
            "downloading images by URL is not available offline: download them beforehand (e.g. with img2dataset), "
            f"name each file by the sha1 of its URL or list them in {URL_MAP_FILE}, and use LocalImageFetcher"
        )


class ConceptualCaptionsSource:
    """One or more Conceptual Captions TSV files, images resolved by an :class:`ImageFetcher`."""

    def __init__(
        self,
        tsv_files: list[str],
        images_root: str,
        fetcher: ImageFetcher | None = None,
        uri: str | None = None,
        workers: int = 8,
    ):
        self.tsv_files = list(tsv_files)
        self.images_root = images_root
        self.fetcher = fetcher if fetcher is not None else LocalImageFetcher(images_root, workers)
        self.uri = uri or (tsv_files[0] if len(tsv_files) == 1 else images_root)
        self._rows: list[tuple[str, UrlImage, str] | SourceProblem] | None = None

    def rows(self) -> list[tuple[str, UrlImage, str] | SourceProblem]:
        """Per TSV line: (caption id, image, caption), or the line's problem."""
        if self._rows is None:
            rows: list[tuple[str, UrlImage, str] | SourceProblem] = []
            for tsv in self.tsv_files:
                stem = posixpath.splitext(posixpath.basename(tsv))[0]
                split = split_from_name(stem)
                text = decode_text(storage.read_bytes(tsv))
                for line_no, line in enumerate(text.split("\n"), start=1):
                    line = line.rstrip("\r")
                    if not line.strip():
                        continue
                    caption_id, fields = f"{stem}-{line_no}", line.split("\t")
                    url = fields[-1].strip() if len(fields) == 2 else ""
                    if not url or not is_utf8(url):
                        why = f"{tsv}:{line_no}: expected caption<TAB>url, got {len(fields)} field(s)"
                        rows.append(SourceProblem(caption_id, "bad_row", why))
                        continue
                    rows.append((caption_id, UrlImage(image_id_for(url), url, split), fields[0]))
            self._rows = rows
        return self._rows

    def images(self) -> Iterator[SourceImage | SourceProblem]:
        """Each distinct URL once, in TSV order."""
        seen: set[str] = set()
        wanted = []
        for row in self.rows():
            if not isinstance(row, SourceProblem) and row[1].url not in seen:
                seen.add(row[1].url)
                wanted.append(row[1])
        return self.fetcher.fetch(wanted)

    def captions(self) -> Iterator[SourceCaption | SourceProblem]:
        """One caption per TSV line (problems for lines that are not ``caption<TAB>url``)."""
        for row in self.rows():
            if isinstance(row, SourceProblem):
                yield row
            else:
                caption_id, image, caption = row
                yield SourceCaption(caption_id, image.image_id, caption, image.split)

    def native_files(self) -> SourceFiles:
        """The TSV files, under ``annotations/``."""
        return SourceFiles(
            {PurePosixPath("annotations", posixpath.basename(t)): storage.read_bytes(t) for t in self.tsv_files}
        )
