"""VQA v2: the answer vocabulary, soft targets that equal the official accuracy, and the dataset.

Answer vocabulary (as bottom-up-attention's ``compute_softscore.py``, which ViLBERT uses): every training
question's ``multiple_choice_answer``, normalised like a prediction (``components.metrics.vqa.normalize_answer``),
is counted once; answers given for at least ``min_count`` questions (VQA v2 with 9: 3,129 answers) form the
vocabulary, most frequent first.  It is saved as JSON next to the checkpoint (:data:`ANSWER_VOCAB_FILE`).

Soft targets: the score of vocabulary answer ``a`` for a question is exactly the official accuracy the
evaluation would give the prediction ``a`` (``components.metrics.vqa.vqa_accuracy``: the mean over the 10
leave-one-out subsets of min(#humans who gave ``a`` / 3, 1)).  With 10 human answers that is 0.3, 0.6, 0.9, 1.0
for 1, 2, 3, >= 4 agreeing humans - the very table of the simplified ``min(count * 0.3, 1)`` that the original
training code uses, so both conventions give the same targets here.  Loss: ``model.losses.vqa_soft_bce_loss``.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from components import storage
from components.data.common import DataError, DatasetReport, EpochItems, check_tokenizer, encode_text, non_empty
from components.data.common import require_features as _require_features
from components.data.regions import RegionSource
from components.data.tasks.common import (
    PredictionRun,
    Predictions,
    ServingAdapter,
    TaskFiles,
    TaskSpec,
    finite,
    item_attention_inputs,
    percent,
    slug,
)
from components.metrics import pictures
from components.metrics.vqa import normalize_answer, vqa_accuracy, vqa_scores
from model.losses import vqa_soft_bce_loss

ANSWER_VOCAB_FILE = "answer_vocab.json"
VOCAB_FORMAT = "vilbert-vqa-answers"
QUESTIONS = "tasks/vqa/v2_OpenEnded_mscoco_{split}_questions.json"
ANNOTATIONS = "tasks/vqa/v2_mscoco_{split}_annotations.json"
METRIC = "vqa_accuracy"
#: Answers a served model lists per request row (``top_answers``).
SERVING_TOP_K = 5


class AnswerVocab:
    """The VQA answer classes: ``vocab[i]`` is the answer of logit i, ``vocab.index[answer]`` its class."""

    def __init__(self, answers: list[str], counts: list[int] | None = None, min_count: int = 1):
        if not answers:
            raise DataError("the answer vocabulary is empty (lower min_count, or check the training annotations)")
        if len(set(answers)) != len(answers):
            raise DataError("the answer vocabulary has duplicate answers")
        self.answers = list(answers)
        self.counts = list(counts) if counts is not None else [0] * len(answers)
        self.min_count = min_count
        self.index = {answer: i for i, answer in enumerate(self.answers)}
        # the evaluation compares normalize_answer(prediction) with the human answers: index by that form
        self._by_compared: dict[str, list[int]] = {}
        for i, answer in enumerate(self.answers):
            self._by_compared.setdefault(normalize_answer(answer), []).append(i)

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, i: int) -> str:
        return self.answers[i]

    @classmethod
    def build(cls, annotations: Iterable[dict[str, Any]], min_count: int = 9) -> AnswerVocab:
        """From VQA annotation entries: normalised ``multiple_choice_answer`` given for >= ``min_count`` questions."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
        kept = sorted(((a, c) for a, c in counts.items() if c >= min_count and a), key=lambda ac: (-ac[1], ac[0]))
        if not kept:
            raise DataError(
                f"no answer is the multiple-choice answer of >= {min_count} questions "
                f"({len(counts)} distinct answers); lower min_count"
            )
        return cls([a for a, _ in kept], [c for _, c in kept], min_count)

    @classmethod
    def from_task_files(cls, files: TaskFiles, split: str = "train", min_count: int = 9) -> AnswerVocab:
        """Build from a split's annotation file, without the rows validation quarantined."""
        rejected = files.rejected("vqa_annotations") | files.rejected("vqa_questions")
        entries = files.read_json(ANNOTATIONS.format(split=split)).get("annotations", [])
        return cls.build([a for a in entries if str(a.get("question_id")) not in rejected], min_count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": VOCAB_FORMAT,
            "version": 1,
            "normalization": "components.metrics.vqa.normalize_answer",
            "min_count": self.min_count,
            "answers": self.answers,
            "counts": self.counts,
        }

    def save(self, uri: str | Path) -> None:
        """Write as JSON (local or ``s3://``; atomically)."""
        storage.write_bytes(str(uri), json.dumps(self.to_dict(), ensure_ascii=False, indent=1).encode("utf-8"))

    @classmethod
    def load(cls, uri: str | Path) -> AnswerVocab:
        data = json.loads(storage.read_bytes(str(uri)))
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise DataError(f"{uri} is not an answer vocabulary written by AnswerVocab.save")
        return cls(data["answers"], data.get("counts"), data.get("min_count", 1))

    def scores(self, human_answers: list[str]) -> Tensor:
        """(A,) float32 soft target: the official accuracy of each vocabulary answer (see the module docstring)."""
        target = torch.zeros(len(self), dtype=torch.float32)
        # Only answers whose normalised form equals a human answer's normalised form can score above 0 (when the
        # humans agree the comparison is raw, which implies equal normalised forms); vqa_accuracy does the rest.
        candidates = {normalize_answer(a) for a in human_answers}
        for candidate in candidates:
            for i in self._by_compared.get(candidate, ()):
                target[i] = vqa_accuracy(self.answers[i], human_answers)
        return target


@dataclass(frozen=True)
class VQADataConfig:
    """Which VQA split and how long questions may be."""

    split: str = "train"
    """Split label in the file names (``train`` / ``val`` / ``test``; real VQA: ``train2014`` ...)."""
    max_text_length: int = 23
    """Tokens per question including [CLS] / [SEP] (the original: 23)."""
    skip_missing_images: bool = False
    """Drop questions whose image has no features (counted) instead of raising."""

    def __post_init__(self) -> None:
        if self.max_text_length < 3:
            raise ValueError(f"max_text_length must be >= 3, got {self.max_text_length}")


class VQADataset(EpochItems, Dataset):
    """One item per question: question tokens, the image's regions, ``labels["answer_scores"]`` (A,) when the split
    is annotated, and ``meta`` (question_id, image_id, answers: the ten human answers, answer_type,
    question_type) for the evaluate step."""

    def __init__(
        self,
        files: TaskFiles,
        regions: RegionSource,
        tokenizer: Any,
        vocab: AnswerVocab,
        config: VQADataConfig | None = None,
    ):
        self.config = config = config or VQADataConfig()
        check_tokenizer(tokenizer, regions.config)
        self.tokenizer, self.regions, self.vocab = tokenizer, regions, vocab
        questions = files.read_json(QUESTIONS.format(split=config.split)).get("questions", [])
        ann_file = ANNOTATIONS.format(split=config.split)
        annotated = files.exists(ann_file)
        answers: dict[str, dict[str, Any]] = {}
        if annotated:
            answers = {str(a.get("question_id")): a for a in files.read_json(ann_file).get("annotations", [])}
        rejected = files.rejected("vqa_questions") | files.rejected("vqa_annotations")
        self.report = DatasetReport(rows=len(questions))
        rows = []
        for q in questions:
            qid = str(q.get("question_id"))
            if qid in rejected:
                self.report.drop("rejected")
            elif annotated and qid not in answers:
                self.report.drop("no_annotation")
            else:
                rows.append(q)
        image_ids = [files.image_id(q.get("image_id")) for q in rows]
        keep, missing = _require_features(image_ids, regions, config.skip_missing_images, "VQA question")
        self.report.drop("missing_features", missing)
        self.items: list[dict[str, Any]] = []
        for q, image_id, ok in zip(rows, image_ids, keep, strict=True):
            if ok:
                ann = answers.get(str(q.get("question_id")))
                self.items.append({"question": q, "image_id": image_id, "annotation": ann})
        self.report.kept = len(self.items)
        self.annotated = annotated
        non_empty(len(self.items), "VQA questions", config.split, self.report)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        _, index = self._key(key, len(self))
        item = self.items[index]
        q, ann = item["question"], item["annotation"]
        text = encode_text(self.tokenizer, q["question"], self.config.max_text_length)
        regions = self.regions[item["image_id"]]
        out: dict[str, Any] = {
            "input_ids": text["input_ids"],
            "token_type_ids": text["token_type_ids"],
            "attention_mask": text["attention_mask"],
            "features": regions.features,
            "boxes": regions.boxes,
            "region_mask": regions.region_mask,
            "labels": {},
            "meta": {"question_id": q["question_id"], "image_id": item["image_id"]},
        }
        if ann is not None:
            human = [a["answer"] for a in ann.get("answers", []) if isinstance(a, dict) and "answer" in a]
            out["labels"]["answer_scores"] = self.vocab.scores(human) if human else torch.zeros(len(self.vocab))
            out["meta"].update(
                answers=human, answer_type=ann.get("answer_type"), question_type=ann.get("question_type")
            )
        return out


def vqa_loss(output: Any, batch: dict[str, Any]) -> Tensor:
    """Soft binary cross-entropy of ``answer_logits`` (B, A) against ``labels["answer_scores"]`` (B, A)."""
    return vqa_soft_bce_loss(output.answer_logits, batch["labels"]["answer_scores"])


def predicted_answers(answer_logits: Tensor, vocab: AnswerVocab) -> list[str]:
    """The answer string of each row's highest logit (what the evaluate step scores)."""
    return [vocab[i] for i in answer_logits.argmax(-1).tolist()]


def _dataset(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, text_length: int, seed: int,
             vocab: Any = None) -> VQADataset:  # fmt: skip
    return VQADataset(files, regions, tokenizer, vocab, VQADataConfig(split=split, max_text_length=text_length))


def _evaluation_data(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, length: dict[str, Any],
                     vocab: AnswerVocab | None = None) -> VQADataset:  # fmt: skip
    if vocab is None:
        raise ValueError("VQA evaluation needs the answer vocabulary")
    vqa = VQADataset(files, regions, tokenizer, vocab, VQADataConfig(split=split, **length))
    if not vqa.annotated:
        raise DataError(f"VQA split {split!r} of {files.root} has no annotation file: accuracy cannot be computed "
                        "(VQA's test-dev answers are scored by the official server)")  # fmt: skip
    return vqa


def _predict(run: PredictionRun) -> Predictions:
    """The answer of the highest answer logit; score = its sigmoid (the head is trained with soft BCE)."""
    vocab, records = run.dataset.vocab, []
    for indices, _batch, out in run.batches():
        logits = finite(out.answer_logits, "answer logits")  # (B, A)
        best = logits.argmax(-1)
        probs = torch.sigmoid(logits.gather(1, best[:, None]))[:, 0]
        for row, index in enumerate(indices):
            item = run.dataset.items[index]
            question, ann = item["question"], item["annotation"] or {}
            answers = [a["answer"] for a in ann.get("answers", []) if isinstance(a, dict) and "answer" in a]
            records.append({
                "question_id": question["question_id"],
                "image_id": item["image_id"],
                "question": question.get("question"),
                "prediction": vocab[int(best[row])],
                "target": ann.get("multiple_choice_answer"),
                "score": float(probs[row]),
                "answers": answers,
                "answer_type": ann.get("answer_type"),
                "question_type": ann.get("question_type"),
            })  # fmt: skip
    return Predictions("vqa", records)


def _score(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    records = predictions.records
    unannotated = [r["question_id"] for r in records if not r.get("answers") or r.get("answer_type") is None]
    if unannotated:
        raise ValueError(
            f"{len(unannotated)} questions have no human answers (e.g. {unannotated[:5]}): VQA accuracy needs the "
            "split's annotation file"
        )
    entries = [{"question_id": r["question_id"], "answers": r["answers"], "answer_type": r["answer_type"],
                **({"question_type": r["question_type"]} if r.get("question_type") is not None else {})}
               for r in records]  # fmt: skip
    result = vqa_scores({r["question_id"]: r["prediction"] for r in records}, entries)
    metrics = {METRIC: percent(result["accuracy"]), "chance": percent(result["chance"])}
    for answer_type, value in result["per_answer_type"].items():
        metrics[f"vqa_accuracy_{slug(answer_type)}"] = percent(value)
    return metrics, [{"accuracy": result["per_question"][r["question_id"]]} for r in records]


def _pictures(predictions: Predictions, images: Callable[[str], bytes], out_dir: Path, count: int) -> list[Path]:
    """Predicted vs ground-truth answer shares."""
    records = predictions.records
    truth = [r["target"] for r in records if r.get("target") is not None]
    return [pictures.answer_distribution_png(out_dir, [r["prediction"] for r in records], truth)] if truth else []


def _serve(out: Any, batch: dict[str, Any], choices: list[tuple[str, ...]], vocab: Any,
           zero_shot: bool) -> list[dict[str, Any]]:  # fmt: skip
    probs = torch.sigmoid(out.answer_logits.float())  # (B, A): trained with binary cross-entropy per answer
    top = probs.topk(min(SERVING_TOP_K, probs.shape[1]), dim=-1)
    results = []
    for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        answers = [vocab[i] for i in indices]
        results.append({"answer": answers[0], "score": values[0], "top_answers": answers, "top_scores": values})
    return results


VQA_TASK = TaskSpec(
    name="vqa",
    heads=("answer",),
    loss=vqa_loss,
    metric=METRIC,
    title="VQA",
    model_name="vilbert-vqa",
    files=(QUESTIONS, ANNOTATIONS),
    text_length=23,
    dataset=_dataset,
    evaluation_data=_evaluation_data,
    predict=_predict,
    score=_score,
    pictures=_pictures,
    attention_inputs=functools.partial(item_attention_inputs, text_key="question"),
    serving=ServingAdapter(
        outputs=(("answer", "string"), ("score", "double"), ("top_answers", "string[]"), ("top_scores", "double[]")),
        example_text="what colour is the circle?",
        decode=_serve,
    ),
    answer_vocab=True,
)
