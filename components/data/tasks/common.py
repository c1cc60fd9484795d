"""Reading a task's native files from a dataset root, and what the fine-tuning datasets share.

:class:`TaskFiles` reads task files (local or ``s3://``), resolves the way each task names its images (a COCO
integer id, a file name, an image id) to the manifest's ``image_id`` that keys the feature store, and lists the
rows the validate step quarantined (``components.validation.rejected_row_ids``), which datasets drop.
:class:`TaskSpec` is everything the steps know about one task: its datasets, heads and loss, how its predictions
are made, scored and pictured, and how a registered model of it answers requests (:class:`ServingAdapter`).
:class:`Predictions` and :class:`PredictionRun` are what the tasks' prediction functions share.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from components import storage
from components.data.collate import Collator, model_inputs, to_device
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


@dataclass
class Predictions:
    """A task's predictions; ``records[i]`` belongs to example i of the data (dataset item / gallery caption)."""

    task: str
    """``vqa``, ``vcr``, ``refcoco+`` or ``retrieval``."""
    records: list[dict[str, Any]]
    """One JSON-able dict per example: ids, ``prediction``, ``target``, ``score`` and task-specific fields."""
    zero_shot: bool = False
    """Retrieval scored with the pretrained alignment head instead of a fine-tuned pair head."""
    scores: np.ndarray | None = None
    """Retrieval: the float32 (captions, images) score matrix over the full gallery; else None."""
    caption_image: list[int] = field(default_factory=list)
    """Retrieval: index into ``image_ids`` of each caption's image (the ground truth)."""
    image_ids: list[str] = field(default_factory=list)
    """Retrieval: the gallery's images, the columns of ``scores``."""

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class PredictionRun:
    """One pass of a model (eval mode, no gradients: the caller's job) over the first ``limit`` examples of a
    task's evaluation data."""

    model: torch.nn.Module
    dataset: Any
    """The task's dataset, or a retrieval gallery."""
    batch_size: int
    device: torch.device
    limit: int | None
    workers: int
    progress: bool
    heads: tuple[str, ...]
    zero_shot: bool = False

    def batches(self) -> Iterator[tuple[range, dict[str, Any], Any]]:
        """``(dataset indices, batch, model output)`` per batch, in dataset order."""
        n = len(self.dataset) if self.limit is None else min(self.limit, len(self.dataset))
        loader = DataLoader(
            Subset(self.dataset, range(n)),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=Collator(pad_token_id=self.dataset.tokenizer.pad_token_id),
        )
        total = math.ceil(n / self.batch_size)
        for number, batch in enumerate(tqdm(loader, total=total, desc="evaluate", disable=not self.progress)):
            start = number * self.batch_size
            out = self.model(**model_inputs(to_device(batch, self.device)), heads=self.heads)
            yield range(start, min(start + self.batch_size, n)), batch, out


def finite(values: Tensor, what: str) -> Tensor:
    """``values`` as float32 on the CPU; NaN or infinite scores mean a broken checkpoint: say so."""
    values = values.detach().float().cpu()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"the model produced NaN or infinite {what}; the checkpoint is broken (diverged training?)")
    return values


def percent(fraction: float) -> float:
    return 100.0 * float(fraction)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "unknown"


def spread(total: int, count: int) -> list[int]:
    """``count`` example indices spread evenly over ``total`` (the first included), so pictures do not all show
    the first image's examples."""
    count = min(count, total)
    return sorted({i * total // count for i in range(count)}) if count > 0 else []


#: The keys of a dataset item the trunk reads (the co-attention pictures rerun it on one example).
TRUNK_KEYS = ("input_ids", "token_type_ids", "attention_mask", "features", "boxes", "region_mask")


def item_attention_inputs(
    predictions: Predictions, index: int, data: Any, text_key: str, chosen_row: bool = False
) -> tuple[dict[str, Tensor], str, str]:
    """The trunk's inputs (batch of 1) for dataset example ``index`` as the model saw it, its image id and its text
    (the record's ``text_key``); ``chosen_row``: the item holds one row per choice (VCR), take the chosen one."""
    record = predictions.records[index]
    item = data[index]
    if chosen_row:  # (choices, ...) -> the chosen answer's row
        inputs = {k: item[k][record["prediction"]][None] for k in TRUNK_KEYS}
    else:
        inputs = {k: item[k][None] for k in TRUNK_KEYS}
    return inputs, record["image_id"], str(record.get(text_key))


@dataclass(frozen=True)
class ServingAdapter:
    """How a registered model of the task answers a request row (``components.serving.predictor``)."""

    outputs: tuple[tuple[str, str], ...]
    """``(column, type)`` per output column, in order; types are MLflow's (``string``, ``double``, ``long``), a
    ``[]`` suffix for an array of them."""
    example_text: str
    """The text of the registered model's input example."""
    decode: Callable[[Any, dict[str, Any], list[tuple[str, ...]], Any, bool], list[dict[str, Any]]]
    """``decode(output, batch, choices per row, answer vocabulary, zero_shot) -> one answer dict per row``."""
    choices: bool = False
    """Each row also carries ``choices`` (the task's answer strings), each paired with the text (VCR)."""

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task: how the trainer runs it on a collated batch, and everything the steps do per task."""

    name: str
    """Task name (``vqa``, ``vcr``, ``refcoco+``, ``retrieval``)."""
    heads: tuple[str, ...]
    """``ViLBertForTasks.forward(heads=...)`` to compute."""
    loss: Callable[[Any, dict[str, Any]], Tensor]
    """``loss(task_output, batch) -> scalar``."""
    metric: str
    """The task's evaluation metric (as the evaluate step reports it)."""
    title: str
    """Display name (the paper table's column)."""
    model_name: str
    """The registered MLflow model of the task."""
    files: tuple[str, ...]
    """The task's native files under a dataset root (``{split}`` filled in); the first must exist."""
    text_length: int
    """Default tokens per text (question, question + answer, expression, caption) as the original code uses."""
    dataset: Callable[..., Any]
    """``dataset(files, regions, tokenizer, split, text_length, seed, vocab)``: the training dataset of a split."""
    evaluation_data: Callable[..., Any]
    """``evaluation_data(files, regions, tokenizer, split, length, vocab)``: the split to score (``length``: a
    ``max_text_length`` keyword or none), a :class:`DataError` when it cannot be scored."""
    predict: Callable[[PredictionRun], Predictions]
    """The :class:`Predictions` of one run over the evaluation data."""
    score: Callable[[Predictions], tuple[dict[str, float], list[dict[str, Any]]]]
    """``(metrics, per-example fields)`` of the predictions (``components.evaluation.scoring``)."""
    pictures: Callable[[Predictions, Callable[[str], bytes], Path, int], list[Path]]
    """``pictures(predictions, image bytes by id, folder, count)``: the task's own pictures; returns the files."""
    attention_inputs: Callable[[Predictions, int, Any], tuple[dict[str, Tensor], str, str]]
    """``(trunk inputs of one example (batch of 1), its image id, its text)`` for the co-attention pictures."""
    serving: ServingAdapter
    """How a registered model of the task answers requests."""
    blind: str = "image"
    """What the task's blind baseline sees of an image (components.data.regions.blind_inputs): ``image`` (nothing:
    question-only VQA, answers-only VCR, text-only retrieval) or ``position`` (boxes only: RefCOCO+)."""
    answer_vocab: bool = False
    """The head answers over a vocabulary read from the task's files (saved beside the checkpoint)."""
    gallery: bool = False
    """Evaluated over a gallery (every text against every image) instead of a dataset."""
    zero_shot: bool = False
    """The pretrained alignment head alone can do the task (zero-shot evaluation and registration)."""
