"""The evaluate step's pictures, drawn with ``components.metrics.pictures`` from the predictions.

* ``retrieval_examples.png`` (retrieval): captions with their top-5 images, the correct one framed;
* ``grounding_examples.png`` (RefCOCO+): images with the predicted (dashed red) and true (green) boxes;
* ``answer_distribution.png`` (VQA answers; VCR answer positions): predicted vs ground-truth shares;
* ``coattention_<nn>.png`` and ``region_attention_<nn>.png`` (every task): the words x regions co-attention
  map of an example, and its image shaded by the attention one word pays to each region.

Co-attention probabilities come from the trunk itself: ``ViLBertModel.forward(..., output_attentions=True)``
returns, per co-attention block, the text->vision probabilities (B, heads, T, R) in
``out.encoder.coattention_probs`` (computed explicitly only when asked; the default path uses fused attention).
The pictures show the last block, averaged over heads.  Images are read from the dataset root through
``manifest.parquet``'s ``path`` column.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from components import storage
from components.data.collate import to_device
from components.data.common import DataError
from components.data.tasks import Predictions, task_spec
from components.data.tasks.common import spread
from components.metrics import pictures

#: Examples that get co-attention pictures (two files each).
ATTENTION_EXAMPLES = 2


class DatasetImages:
    """Image bytes by image id, from a dataset root (local or ``s3://``) and its ``manifest.parquet``."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self._paths: dict[str, str] | None = None

    def __call__(self, image_id: str) -> bytes:
        if self._paths is None:
            manifest = storage.join(self.root, "manifest.parquet")
            try:
                table = pq.read_table(io.BytesIO(storage.read_bytes(manifest)), columns=["image_id", "path"])
            except FileNotFoundError:
                raise DataError(f"no manifest at {manifest}: the pictures need the dataset's images") from None
            self._paths = dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(), strict=True))
        rel = self._paths.get(image_id)
        if rel is None:
            raise DataError(f"image {image_id!r} is not in {storage.join(self.root, 'manifest.parquet')}")
        uri = storage.join(self.root, rel)
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise DataError(
                f"image file {uri} (image {image_id!r}) is missing from the dataset root; restore it (re-run ingest) "
                "or evaluate without pictures (pictures=0)"
            ) from None


def make_pictures(
    predictions: Predictions,
    data: Any,
    model: torch.nn.Module,
    images: DatasetImages,
    out_dir: Path,
    count: int,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Draw the task's pictures for the first ``count`` examples into ``out_dir``; returns the files written."""
    if count <= 0 or not predictions.records:
        return []
    spec = task_spec(predictions.task)
    paths = spec.pictures(predictions, images, out_dir, count)
    for number, index in enumerate(spread(len(predictions.records), min(count, ATTENTION_EXAMPLES))):
        paths += attention_pictures(predictions, index, number, data, model, images, out_dir, device)
    return paths


def attention_inputs(predictions: Predictions, index: int, data: Any) -> tuple[dict[str, torch.Tensor], str, str]:
    """The trunk's inputs (batch of 1) for example ``index`` as the model saw it, its image id and its text.

    VCR: the question paired with the chosen answer; retrieval: the caption with its true image."""
    return task_spec(predictions.task).attention_inputs(predictions, index, data)


def coattention_map(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device | str) -> Any:
    """Text->vision co-attention of the last co-attention block, mean over heads: float32 (T, R), or None when
    the model has no co-attention blocks."""
    trunk: Any = model.vilbert
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = trunk(**to_device(inputs, device), output_attentions=True)
    finally:
        model.train(was_training)
    probs = out.encoder.coattention_probs
    if not probs:
        return None
    return probs[-1][0][0].float().mean(0).cpu().numpy()  # block -1, text->vision, example 0: (nh, T, R) -> (T, R)


def attention_pictures(
    predictions: Predictions,
    index: int,
    number: int,
    data: Any,
    model: torch.nn.Module,
    images: DatasetImages,
    out_dir: Path,
    device: torch.device | str,
) -> list[Path]:
    """``coattention_<number>.png`` and ``region_attention_<number>.png`` of example ``index``."""
    inputs, image_id, text = attention_inputs(predictions, index, data)
    matrix = coattention_map(model, inputs, device)
    if matrix is None:
        return []
    tokens = int(inputs["attention_mask"][0].sum())
    regions = int(inputs["region_mask"][0].sum())
    matrix = matrix[:tokens, :regions]
    ids = inputs["input_ids"][0, :tokens].tolist()
    words = data.tokenizer.convert_ids_to_tokens(ids)
    labels = ["image"] + [str(i) for i in range(1, regions)]
    title = f"co-attention (last block, mean of heads): {text}"
    paths = [pictures.attention_matrix_png(out_dir, matrix, words, region_labels=labels, title=title[:120],
                                           name=f"coattention_{number:02d}.png")]  # fmt: skip
    if regions < 2:  # no detected region (a blind baseline sees only the whole-image token): nothing to point at
        return paths
    # the word whose attention is most concentrated on one detected region (special tokens are not words)
    specials = set(data.tokenizer.all_special_ids)
    candidates = [i for i, token in enumerate(ids) if token not in specials] or [0]
    word = max(candidates, key=lambda i: float(matrix[i, 1:].max()))
    boxes = data.regions[image_id].pixel_boxes[1:regions].numpy()
    paths.append(pictures.region_attention_png(out_dir, images(image_id), boxes, np.asarray(matrix[word, 1:]),
                                               word=words[word], name=f"region_attention_{number:02d}.png"))  # fmt: skip
    return paths
