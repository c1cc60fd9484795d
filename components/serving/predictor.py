"""Answering requests with a registered ViLBERT model: image + text in, answer / score / box out.

:class:`ViLBertPredictor` is the whole inference path, without MLflow: it reads each request image (base64,
a ``data:`` URI, a local path, ``file://`` or ``s3://``), runs the bundled feature extractor on it (the very
backend code the ``features`` step runs), turns the regions into the model's visual inputs exactly as training
read them from the store (the record is validated against the feature spec and rounded to float16 like a stored
one, then :func:`components.data.regions.region_inputs`), tokenises the text with the checkpoint's tokenizer,
collates, and runs the task head.  Per row it returns (columns by task, :data:`OUTPUT_COLUMNS`):

* ``vqa``: ``answer``, ``score`` (sigmoid of its logit: the head is trained with binary cross-entropy),
  ``top_answers`` / ``top_scores`` (best five);
* ``vcr``: ``choice`` (0-3), ``answer`` (that choice's text), ``score`` and ``scores`` (softmax over the four);
* ``refcoco+``: ``box`` [x1, y1, x2, y2] in pixels of the request image, ``score`` (softmax over the detected
  regions; region 0, the whole image, is never an answer, as in evaluation), ``region`` (its index);
* ``retrieval``: ``score``, the pair logit (higher = better match; compare it across images or captions), or
  for a zero-shot model the alignment head's match probability.

:func:`pyfunc_model` wraps the predictor as an MLflow python model (loaded "from code": nothing is unpickled).
Bad requests raise :class:`ServingInputError` naming the row and the problem (HTTP 400 behind MLflow's server).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

from components.data.tasks import TASKS, ServingAdapter

#: Artifact names of a registered model (``artifacts=`` of ``mlflow.pyfunc.log_model``).
CHECKPOINT, EXTRACTOR, TASK = "checkpoint", "extractor", "task"
SERVING_FILE, SERVING_FORMAT = "serving.json", "vilbert-serving/1"
MAX_IMAGE_BYTES = 64 * 2**20  # a request image larger than this is refused (before decoding)
NUM_CHOICES = 4
DEVICE_ENV = "VILBERT_SERVING_DEVICE"  # cpu, cuda, cuda:1 ...; default: cuda when available
#: "0": refuse local paths and file:// URIs (a server open to untrusted clients should not read its own files).
LOCAL_FILES_ENV = "VILBERT_SERVING_LOCAL_FILES"

#: Output columns per task (the registered signature lists the same, with types): each task's ``ServingAdapter``.
OUTPUT_COLUMNS: dict[str, tuple[str, ...]] = {name: spec.serving.columns for name, spec in TASKS.items()}


class ServingInputError(ValueError):
    """A request the model cannot answer (missing column, unreadable image, wrong number of choices)."""


@dataclass(frozen=True)
class ServingSpec:
    """``serving.json``: how requests become model inputs for one registered model."""

    task: str
    """``vqa``, ``vcr``, ``refcoco+`` or ``retrieval``."""
    max_text_length: int
    """Tokens per text (pair) including special tokens: the fine-tuning setting."""
    max_regions: int
    """Regions per image including the whole-image token: the fine-tuning setting."""
    zero_shot: bool = False
    """Retrieval with the pretraining alignment head (a pretrained, not fine-tuned, model)."""
    batch_size: int = 16
    """Rows per forward pass (a request with more rows is split)."""

    def __post_init__(self) -> None:
        if self.task not in OUTPUT_COLUMNS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(OUTPUT_COLUMNS)}")
        if self.max_text_length < 4 or self.max_regions < 2 or self.batch_size < 1:
            raise ValueError("need max_text_length >= 4, max_regions >= 2 and batch_size >= 1")
        if self.zero_shot and not TASKS[self.task].zero_shot:
            raise ValueError("zero_shot applies to retrieval only")

    def to_dict(self) -> dict[str, Any]:
        return {"format": SERVING_FORMAT, **self.__dict__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServingSpec:
        if data.get("format") != SERVING_FORMAT:
            raise ValueError(f"not a {SERVING_FORMAT} file (format {data.get('format')!r})")
        return cls(**{k: v for k, v in data.items() if k != "format"})


def image_bytes(value: Any) -> bytes:
    """The bytes of a request image: base64 (optionally a ``data:`` URI), a local path, ``file://`` or ``s3://``.

    Nothing is fetched over HTTP(S): the server never downloads.  ``VILBERT_SERVING_LOCAL_FILES=0`` refuses paths."""
    from components import storage

    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise ServingInputError("image must be a non-empty string: base64, a path, file:// or s3:// URI")
    text = value.strip()
    scheme = urlparse(text).scheme.lower() if "://" in text[:16] else ""
    if scheme in ("http", "https"):
        raise ServingInputError("http(s) images are not fetched (the server never downloads): send base64 or a path")
    if scheme == "s3":
        try:
            return storage.read_bytes(text)
        except FileNotFoundError:
            raise ServingInputError(f"image {text} not found") from None
    local_files = os.environ.get(LOCAL_FILES_ENV, "1") != "0"
    if scheme == "file":
        if not local_files:
            raise ServingInputError(f"this server does not read local files ({LOCAL_FILES_ENV}=0): send base64")
        return _read_local(unquote(urlparse(text).path))
    if scheme:
        raise ServingInputError(f"unsupported image URI scheme {scheme!r} (use base64, a path, file:// or s3://)")
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header:
            raise ServingInputError("a data: URI image must be base64-encoded (data:image/png;base64,...)")
        return _b64(payload)
    if local_files and len(text) < 4096 and Path(text).is_file():
        return _read_local(text)
    try:
        return _b64(text)
    except ServingInputError:
        raise ServingInputError(
            f"image {text[:60]!r}{'...' if len(text) > 60 else ''} is neither an existing file nor valid base64"
        ) from None


def _read_local(path: str) -> bytes:
    file = Path(path)
    if not file.is_file():
        raise ServingInputError(f"image file {path} not found")
    if file.stat().st_size > MAX_IMAGE_BYTES:
        raise ServingInputError(f"image file {path} is larger than {MAX_IMAGE_BYTES} bytes")
    return file.read_bytes()


def _b64(text: str) -> bytes:
    compact = "".join(text.split())  # tolerate line-wrapped base64 (the `base64` tool wraps at 76 columns)
    if len(compact) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ServingInputError(f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServingInputError(f"image is not valid base64 ({exc})") from None


# --- tasks: text encoding and output decoding ------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    index: int
    text: str
    choices: tuple[str, ...] = ()


def _encode_single(tokenizer: Any, row: _Row, spec: ServingSpec) -> dict[str, Any]:
    from components.data.common import encode_text

    enc = encode_text(tokenizer, row.text, spec.max_text_length)
    return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def _encode_choices(tokenizer: Any, row: _Row, spec: ServingSpec) -> dict[str, Any]:
    from components.data.common import encode_text
    from components.data.tasks.vcr import stack_choices

    texts = [encode_text(tokenizer, row.text, spec.max_text_length, pair=answer) for answer in row.choices]
    return stack_choices(texts, tokenizer.pad_token_id)


# --- the predictor -----------------------------------------------------------------------------------------------


class ViLBertPredictor:
    """A loaded registered model: :meth:`predict` maps a request DataFrame to an answer DataFrame."""

    def __init__(self, model: Any, tokenizer: Any, extractor: Any, feature_spec: Any, spec: ServingSpec,
                 vocab: Any = None, device: str = "cpu") -> None:  # fmt: skip
        task = TASKS[spec.task]
        if task.answer_vocab and vocab is None:
            raise ValueError(f"a {task.title} model needs its answer vocabulary")
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.extractor = extractor
        self.feature_spec = feature_spec
        self.spec = spec
        self.vocab = vocab
        self.device = device
        self.adapter: ServingAdapter = task.serving
        self.heads: tuple[str, ...] = ("alignment",) if spec.zero_shot else task.heads

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, str], device: str | None = None) -> ViLBertPredictor:
        """Load from the artifact folders of a registered model (``checkpoint``, ``extractor``, ``task``)."""
        import torch

        from components.data.tasks.vqa import ANSWER_VOCAB_FILE, AnswerVocab
        from components.serving.bundle import load_bundled_extractor
        from model.checkpoint import load_checkpoint, read_header
        from model.tokenizer import load_tokenizer

        missing = {CHECKPOINT, EXTRACTOR, TASK} - set(artifacts)
        if missing:
            raise ValueError(f"the registered model lacks the artifacts {sorted(missing)}")
        device = device or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        task_dir = Path(artifacts[TASK])
        spec = ServingSpec.from_dict(json.loads((task_dir / SERVING_FILE).read_text()))
        # kind "tasks" for every checkpoint: a zero-shot (pretraining) one keeps its alignment head under pretraining.
        model = load_checkpoint(artifacts[CHECKPOINT], kind="tasks", num_answers=1 if spec.zero_shot else None)
        extractor, feature_spec = load_bundled_extractor(artifacts[EXTRACTOR], device)
        feature_spec.check_model(model.config)
        vocab = AnswerVocab.load(task_dir / ANSWER_VOCAB_FILE) if TASKS[spec.task].answer_vocab else None
        answers = read_header(artifacts[CHECKPOINT]).get("num_answers")
        if vocab is not None and len(vocab) != answers:
            raise ValueError(f"the answer vocabulary has {len(vocab)} answers, the model's head {answers}")
        return cls(model, load_tokenizer(artifacts[CHECKPOINT]), extractor, feature_spec, spec, vocab, device)

    @property
    def columns(self) -> tuple[str, ...]:
        return OUTPUT_COLUMNS[self.spec.task]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One output row per input row (columns: :attr:`columns`); see the module docstring."""
        rows = self._rows(frame)  # every row's text is checked before any image is read
        out: list[dict[str, Any]] = []
        for start in range(0, len(rows), self.spec.batch_size):
            batch = rows[start : start + self.spec.batch_size]
            out += self._predict_batch(batch, [self._image(frame, row.index) for row in batch])
        return pd.DataFrame(out, columns=list(self.columns))

    def region_inputs(self, images: Sequence[Any]) -> list[Any]:
        """Visual inputs of decoded RGB images, built exactly as training read them from the feature store."""
        import numpy as np

        from components.data.regions import region_inputs
        from components.features.spec import BOX_DTYPE, VALUE_DTYPE, InvalidRegionFeatures, RegionFeatures

        found = self.extractor.extract(list(images))
        inputs = []
        for n, (image, regions) in enumerate(zip(images, found, strict=True)):
            height, width = image.shape[:2]
            record = RegionFeatures(f"request-{n}", regions.boxes, regions.features, regions.class_probs, width, height)
            try:
                record.validate(self.feature_spec)  # what the store's writer checks before it stores a record
            except InvalidRegionFeatures as exc:
                raise ServingInputError(
                    f"the extractor's regions for image {n} break the feature spec: {exc}"
                ) from None
            stored = RegionFeatures(record.image_id, np.asarray(regions.boxes, BOX_DTYPE),
                                    np.asarray(regions.features, VALUE_DTYPE),
                                    np.asarray(regions.class_probs, VALUE_DTYPE), width, height)  # fmt: skip
            inputs.append(region_inputs(stored, self.spec.max_regions))
        return inputs

    def _rows(self, frame: pd.DataFrame) -> list[_Row]:
        if not isinstance(frame, pd.DataFrame):
            raise ServingInputError(f"expected a DataFrame with columns image and text, got {type(frame).__name__}")
        needed = ["image", "text"] + (["choices"] if self.adapter.choices else [])
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ServingInputError(f"the request lacks the column(s) {missing} (this {self.spec.task} model needs "
                                    f"{needed})")  # fmt: skip
        rows = []
        for n, (text, choices) in enumerate(
            zip(frame["text"].tolist(), frame["choices"].tolist() if self.adapter.choices else [None] * len(frame),
                strict=True)
        ):  # fmt: skip
            if not isinstance(text, str) or not text.strip():
                raise ServingInputError(f"row {n}: text must be a non-empty string")
            options: tuple[str, ...] = ()
            if self.adapter.choices:
                options = tuple(choices) if isinstance(choices, list | tuple) or hasattr(choices, "tolist") else ()
                if len(options) != NUM_CHOICES or not all(isinstance(c, str) and c.strip() for c in options):
                    raise ServingInputError(f"row {n}: choices must be a list of {NUM_CHOICES} non-empty strings")
            rows.append(_Row(n, text, options))
        return rows

    def _image(self, frame: pd.DataFrame, n: int) -> Any:
        from components.features.backends.base import decode_rgb

        try:
            data = image_bytes(frame["image"].iloc[n])
        except ServingInputError as exc:
            raise ServingInputError(f"row {n}: {exc}") from None
        try:
            return decode_rgb(data)
        except Exception as exc:  # Pillow raises many types for damaged or non-image data
            raise ServingInputError(f"row {n}: image cannot be decoded ({type(exc).__name__}: {exc})") from None

    def _predict_batch(self, rows: Sequence[_Row], images: Sequence[Any]) -> list[dict[str, Any]]:
        import torch

        from components.data.collate import Collator, model_inputs, to_device

        items = []
        for row, regions in zip(rows, self.region_inputs(images), strict=True):
            text = (_encode_choices if self.adapter.choices else _encode_single)(self.tokenizer, row, self.spec)
            visual = {"features": regions.features, "boxes": regions.boxes, "region_mask": regions.region_mask}
            meta: dict[str, Any] = {"pixel_boxes": regions.pixel_boxes}
            if self.adapter.choices:  # the same image for every choice (as the VCR dataset builds its items)
                visual = {k: v.expand(NUM_CHOICES, *v.shape) for k, v in visual.items()}
                meta["num_choices"] = NUM_CHOICES
            items.append({**text, **visual, "labels": {}, "meta": meta})
        batch = Collator(pad_token_id=self.tokenizer.pad_token_id)(items)
        with torch.inference_mode():
            out = self.model(**to_device(model_inputs(batch), self.device), heads=self.heads)
            out = _to_cpu(out)
        return self.adapter.decode(out, batch, [row.choices for row in rows], self.vocab, self.spec.zero_shot)


def _to_cpu(out: Any) -> Any:
    """The head outputs of a TaskOutput on the CPU (the trunk is dropped)."""
    for name in ("answer_logits", "pair_logit", "alignment_logits", "region_logits"):
        value = getattr(out, name)
        if value is not None:
            setattr(out, name, value.cpu())
    out.trunk = None
    return out


def pyfunc_model() -> Any:
    """The MLflow python model around :class:`ViLBertPredictor` (the models-from-code entry sets it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from mlflow.pyfunc import PythonModel

    class ViLBertPyfunc(PythonModel):
        """Registered ViLBERT: image + text in, answer / score / box out (see components/serving/predictor.py)."""

        def load_context(self, context: Any) -> None:
            self.predictor = ViLBertPredictor.from_artifacts(context.artifacts)

        def predict(
            self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
        ) -> pd.DataFrame:
            try:
                return self.predictor.predict(model_input)
            except ServingInputError as exc:  # a client error: MLflow's server answers 400 with this message
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    return ViLBertPyfunc()
