"""Reading a task's native files from a dataset root, and what the fine-tuning datasets share.

:class:`TaskFiles` reads task files (local or ``s3://``), resolves the way each task names its images (a COCO
integer id, a file name, an image id) to the manifest's ``image_id`` that keys the feature store, and lists the
rows the validate step quarantined (``components.validation.rejected_row_ids``), which datasets drop.
:class:`TaskSpec` says which heads a task runs and how its loss is computed from a batch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from torch import Tensor

from components import storage
from components.data.common import DataError

#: COCO instance files whose ``images`` lists map COCO integer ids to file names (and so to manifest ids).
COCO_IMAGE_FILES = ("annotations/instances.json", "tasks/refcoco+/instances.json")
MANIFEST_VALID = "manifest.valid.parquet"


class TaskFiles:
    """A dataset root's task files; ``validation`` (the validate step's output folder) decides which rows to drop.

    Without ``validation`` nothing is dropped and images resolve against the root's ``manifest.parquet``; the
    pipeline always passes it (then the accepted ``manifest.valid.parquet`` is used).
    """

    def __init__(self, root: str | Path, validation: str | Path | None = None):
        self.root = str(root)
        self.validation = None if validation is None else str(validation)
        self._index: Any = None  # components.validation.refs.ImageIndex, built on first use
        self._coco_loaded = False
        self._rejected: dict[str, set[str]] = {}

    def path(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        return storage.exists(self.path(rel))

    def read_json(self, rel: str) -> Any:
        """A JSON task file; a missing or unreadable file is a :class:`DataError` naming it."""
        try:
            return json.loads(storage.read_bytes(self.path(rel)))
        except FileNotFoundError:
            raise DataError(f"task file {self.path(rel)} not found") from None
        except ValueError as exc:
            raise DataError(f"task file {self.path(rel)} is not valid JSON: {exc}") from None

    def read_jsonl(self, rel: str) -> list[tuple[int, dict[str, Any]]]:
        """``(line number, object)`` per non-empty line of a JSON-lines task file."""
        try:
            text = storage.read_bytes(self.path(rel)).decode("utf-8")
        except FileNotFoundError:
            raise DataError(f"task file {self.path(rel)} not found") from None
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as exc:
                    raise DataError(f"{self.path(rel)} line {n} is not JSON ({exc}); validate the dataset") from None
        return rows

    def rejected(self, table: str) -> set[str]:
        """Row ids of ``table`` that validation quarantined (empty without a validation folder)."""
        if self.validation is None:
            return set()
        if table not in self._rejected:
            from components.validation import rejected_row_ids

            self._rejected[table] = rejected_row_ids(self.validation, table)
        return self._rejected[table]

    def _manifest_index(self) -> Any:
        from components.validation.refs import ImageIndex

        uri = (
            storage.join(self.validation, MANIFEST_VALID)
            if self.validation
            else storage.join(self.root, "manifest.parquet")
        )
        try:
            frame = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image_id", "path"]).to_pandas()
        except FileNotFoundError:
            raise DataError(
                f"no manifest at {uri} (a validation that failed writes no manifest.valid.parquet)"
            ) from None
        return ImageIndex.from_manifest(frame, range(len(frame)))

    def resolve_image(self, *refs: Any) -> str | None:
        """The manifest image_id that ``refs`` name (first that resolves), or None.

        COCO instance files are read only when a reference does not resolve directly (for COCO itself the
        manifest ids are the integer ids, so the large instance files are never parsed)."""
        if self._index is None:
            self._index = self._manifest_index()
        found = self._index.resolve(*refs)
        if found is None and not self._coco_loaded:
            self._coco_loaded = True
            for rel in COCO_IMAGE_FILES:
                if self.exists(rel):
                    data = self.read_json(rel)
                    self._index.add_coco_images(data.get("images", []) if isinstance(data, dict) else [])
            found = self._index.resolve(*refs)
        return found

    def image_id(self, *refs: Any) -> str:
        """:meth:`resolve_image`, or the first reference as text (then the store check reports it as missing)."""
        found = self.resolve_image(*refs)
        return found if found is not None else str(next((r for r in refs if r is not None), ""))


@dataclass(frozen=True)
class TaskSpec:
    """How the trainer runs one fine-tuning task on a collated batch."""

    name: str
    """Task name (``vqa``, ``vcr``, ``refcoco+``, ``retrieval``)."""
    heads: tuple[str, ...]
    """``ViLBertForTasks.forward(heads=...)`` to compute."""
    loss: Callable[[Any, dict[str, Any]], Tensor]
    """``loss(task_output, batch) -> scalar``."""
    metric: str
    """The task's evaluation metric (as the evaluate step reports it)."""
    blind: str = "image"
    """What the task's blind baseline sees of an image (components.data.regions.blind_inputs): ``image`` (nothing:
    question-only VQA, answers-only VCR, text-only retrieval) or ``position`` (boxes only: RefCOCO+)."""
