"""VCR-style Q->A multiple choice: each question with its four answers, one image.

An item holds the four ``[CLS] question [SEP] answer_k [SEP]`` pairs (segment ids 0 for the question part, 1
for the answer, as the original ``vcr_dataset.py``), so its text tensors are (4, T) and its region tensors
(4, N, ...) (the same image for every choice); ``labels["choice"]`` is the right answer's index.  The collator
flattens a batch to B*4 rows (row ``b * 4 + k`` = item b, answer k), the model scores each pair and the pair
logits are reshaped to (B, 4)::

    out = model(**model_inputs(batch), heads=("pair",))
    logits = out.pair_logit.view(-1, batch["meta"]["num_choices"])        # (B, 4)
    loss = multiple_choice_loss(logits, batch["labels"]["choice"])

Real VCR writes questions and answers as token lists where ``[0, 2]`` names detected objects; those become the
objects' names (``objects[i]``; the original draws a random gender-neutral name for each "person", which needs a
names table this project does not ship).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from components.data.common import (
    DataError,
    DatasetReport,
    EpochItems,
    check_tokenizer,
    encode_text,
    non_empty,
    require_features,
)
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
)
from components.metrics import pictures
from components.metrics.vcr import vcr_predictions, vcr_scores
from model.losses import multiple_choice_loss

NUM_CHOICES = 4
VCR_FILE = "tasks/vcr/{split}.jsonl"
METRIC = "vcr_q2a_accuracy"


def vcr_text(tokens: Any, objects: list[str]) -> str:
    """A VCR question / answer as plain text: strings as they are, object references replaced by names."""
    if isinstance(tokens, str):
        return tokens
    if not isinstance(tokens, list):
        raise DataError(f"a VCR question or answer must be a string or a token list, got {type(tokens).__name__}")
    words = []
    for token in tokens:
        if isinstance(token, list):
            names = [objects[i] if isinstance(i, int) and 0 <= i < len(objects) else "object" for i in token]
            words.append(" and ".join(names))
        else:
            words.append(str(token))
    return " ".join(words)


def stack_choices(texts: list[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Encoded texts of one item's choices -> (K, T) tensors, padded to the longest choice."""
    longest = max(t["input_ids"].shape[0] for t in texts)
    out = {}
    for key, value in (("input_ids", pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
        rows = [torch.cat([t[key], t[key].new_full((longest - t[key].shape[0],), value)]) for t in texts]
        out[key] = torch.stack(rows)
    return out


@dataclass(frozen=True)
class VCRDataConfig:
    """Which VCR split and how long a question-answer pair may be."""

    split: str = "train"
    """The file ``tasks/vcr/<split>.jsonl``."""
    max_text_length: int = 40
    """Tokens per (question, answer) pair including [CLS] and two [SEP] (the multi-task release: 40)."""
    skip_missing_images: bool = False
    """Drop questions whose image has no features (counted) instead of raising."""

    def __post_init__(self) -> None:
        if self.max_text_length < 4:
            raise ValueError(f"max_text_length must be >= 4, got {self.max_text_length}")


class VCRDataset(EpochItems, Dataset):
    """One item per question, expanded to its four (question, answer) pairs; see the module docstring."""

    def __init__(self, files: TaskFiles, regions: RegionSource, tokenizer: Any, config: VCRDataConfig | None = None):
        self.config = config = config or VCRDataConfig()
        check_tokenizer(tokenizer, regions.config)
        self.tokenizer, self.regions = tokenizer, regions
        lines = files.read_jsonl(VCR_FILE.format(split=config.split))
        rejected = files.rejected("vcr")
        self.report = DatasetReport(rows=len(lines))
        rows = []
        for n, row in lines:
            row_id = str(row["annot_id"]) if row.get("annot_id") is not None else f"{config.split}.jsonl:{n}"
            if row_id in rejected:
                self.report.drop("rejected")
            elif len(row.get("answer_choices") or []) != NUM_CHOICES:
                self.report.drop("not_four_choices")  # validation quarantines these; without it, skip them
            else:
                rows.append((row_id, row))
        image_ids = [files.image_id(row.get("img_fn"), row.get("img_id")) for _, row in rows]
        keep, missing = require_features(image_ids, regions, config.skip_missing_images, "VCR question")
        self.report.drop("missing_features", missing)
        self.items: list[dict[str, Any]] = [
            {"row_id": row_id, "row": row, "image_id": image_id}
            for (row_id, row), image_id, ok in zip(rows, image_ids, keep, strict=True)
            if ok
        ]
        self.report.kept = len(self.items)
        non_empty(len(self.items), "VCR questions", config.split, self.report)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        _, index = self._key(key, len(self))
        item = self.items[index]
        row = item["row"]
        objects = [str(o) for o in row.get("objects") or []]
        question = vcr_text(row["question"], objects)
        texts = [
            encode_text(self.tokenizer, question, self.config.max_text_length, pair=vcr_text(answer, objects))
            for answer in row["answer_choices"]
        ]
        text = stack_choices(texts, self.tokenizer.pad_token_id)
        regions = self.regions[item["image_id"]]
        out: dict[str, Any] = {
            **text,
            # expand: the same image for every choice, without copying (the collator materialises the batch)
            "features": regions.features.expand(NUM_CHOICES, -1, -1),
            "boxes": regions.boxes.expand(NUM_CHOICES, -1, -1),
            "region_mask": regions.region_mask.expand(NUM_CHOICES, -1),
            "labels": {},
            "meta": {"annot_id": item["row_id"], "image_id": item["image_id"], "num_choices": NUM_CHOICES},
        }
        label = row.get("answer_label")
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < NUM_CHOICES:
            out["labels"]["choice"] = torch.tensor(label)
        return out


def multiple_choice_logits(output: Any, batch: dict[str, Any]) -> Tensor:
    """(B*K, 1) pair logits -> (B, K)."""
    return output.pair_logit.view(-1, batch["meta"]["num_choices"])


def choice_loss(output: Any, batch: dict[str, Any]) -> Tensor:
    """Softmax cross-entropy over each item's K pair logits against ``labels["choice"]``."""
    return multiple_choice_loss(multiple_choice_logits(output, batch), batch["labels"]["choice"])


def valid_label(label: Any) -> bool:
    """``answer_label`` is the index of one of the choices."""
    return isinstance(label, int) and not isinstance(label, bool) and 0 <= label < NUM_CHOICES


def _dataset(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, text_length: int, seed: int,
             vocab: Any = None) -> VCRDataset:  # fmt: skip
    return VCRDataset(files, regions, tokenizer, VCRDataConfig(split=split, max_text_length=text_length))


def _evaluation_data(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, length: dict[str, Any],
                     vocab: Any = None) -> VCRDataset:  # fmt: skip
    vcr = VCRDataset(files, regions, tokenizer, VCRDataConfig(split=split, **length))
    unlabelled = [it["row_id"] for it in vcr.items if not valid_label(it["row"].get("answer_label"))]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} VCR rows of split {split!r} have no valid answer_label "
                        f"(e.g. {unlabelled[:5]}): Q->A accuracy cannot be computed")  # fmt: skip
    return vcr


def _predict(run: PredictionRun) -> Predictions:
    """The answer choice of the highest pair logit (``components.metrics.vcr.vcr_predictions``: ties go to the
    lowest index); score = its softmax probability over the four choices."""
    records = []
    for indices, batch, out in run.batches():
        logits = finite(multiple_choice_logits(out, batch), "pair logits")  # (B, 4)
        chosen = vcr_predictions(logits.numpy())
        probs = torch.softmax(logits, -1)
        for row, index in enumerate(indices):
            item = run.dataset.items[index]
            label = item["row"].get("answer_label")
            valid = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < logits.shape[1]
            records.append({
                "annot_id": item["row_id"],
                "image_id": item["image_id"],
                "question": item["row"].get("question"),
                "prediction": int(chosen[row]),
                "target": label if valid else None,
                "score": float(probs[row, chosen[row]]),
                "choice_scores": logits[row].tolist(),
            })  # fmt: skip
    return Predictions("vcr", records)


def _score(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    records = predictions.records
    unlabelled = [r["annot_id"] for r in records if r.get("target") is None]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} VCR questions have no answer_label (e.g. {unlabelled[:5]})")
    result = vcr_scores([r["choice_scores"] for r in records], [r["target"] for r in records])
    metrics = {METRIC: percent(result["accuracy"]), "chance": percent(result["chance"])}
    return metrics, [{"correct": c} for c in result["correct"]]


def _pictures(predictions: Predictions, images: Callable[[str], bytes], out_dir: Path, count: int) -> list[Path]:
    """Chosen vs correct answer positions."""
    records = predictions.records
    truth = [f"answer {r['target'] + 1}" for r in records if r.get("target") is not None]
    if not truth:
        return []
    chosen = [f"answer {r['prediction'] + 1}" for r in records]
    title = "VCR Q->A: chosen vs correct answer position"
    return [pictures.answer_distribution_png(out_dir, chosen, truth, title=title)]


def _serve(out: Any, batch: dict[str, Any], choices: list[tuple[str, ...]], vocab: Any,
           zero_shot: bool) -> list[dict[str, Any]]:  # fmt: skip
    probs = torch.softmax(out.pair_logit.float().view(-1, NUM_CHOICES), dim=-1)  # (B, 4), row b*4+k = choice k
    results = []
    for options, scores in zip(choices, probs.tolist(), strict=True):
        choice = max(range(NUM_CHOICES), key=scores.__getitem__)
        results.append({"choice": choice, "answer": options[choice], "score": scores[choice], "scores": scores})
    return results


VCR_TASK = TaskSpec(
    name="vcr",
    heads=("pair",),
    loss=choice_loss,
    metric=METRIC,
    title="VCR Q→A",
    model_name="vilbert-vcr",
    files=(VCR_FILE,),
    text_length=40,
    dataset=_dataset,
    evaluation_data=_evaluation_data,
    predict=_predict,
    score=_score,
    pictures=_pictures,
    attention_inputs=functools.partial(item_attention_inputs, text_key="question", chosen_row=True),
    serving=ServingAdapter(
        outputs=(("choice", "long"), ("answer", "string"), ("score", "double"), ("scores", "double[]")),
        example_text="which shape is at the top?",
        decode=_serve,
        choices=True,
    ),
)
