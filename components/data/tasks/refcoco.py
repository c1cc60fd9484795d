"""RefCOCO+ referring expressions: which region does the sentence name?

One item per (ref, sentence) of the split (``refs(unc).json`` + the COCO boxes of ``instances.json``).  The
referred object's box (COCO ``[x, y, w, h]`` -> pixel ``[x1, y1, x2, y2]``) is compared with every detected
region: ``labels["grounding_targets"]`` (N,) is 1 where the region's IoU with it is >= ``iou_threshold`` (0.5),
0 elsewhere, and always 0 for region 0 (the whole image is not an answer) and padding; with ``soft_targets``
the target is the IoU itself above the threshold, as the original ``refer_expression_dataset.py``.  IoU is the
continuous one (``torchvision.ops.box_iou``; the original adds 1 pixel to widths, a legacy of integer boxes).

For evaluation ``meta`` keeps ``target_box`` (4,) and ``pixel_boxes`` (N, 4) (region 0 = the whole image):
a prediction is right when the chosen region's IoU with the target box is >= 0.5 (:func:`grounding_hits`).
Loss: ``model.losses.grounding_loss`` over region logits (B, N) (:func:`grounding_loss_of`).
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
    spread,
)
from components.metrics import grounding_scores, pictures
from components.metrics.grounding import IOU_THRESHOLD
from model.losses import grounding_loss

REFS_FILE = "tasks/refcoco+/refs(unc).json"
INSTANCES_FILE = "tasks/refcoco+/instances.json"
METRIC = "grounding_accuracy"
#: Expressions the grounding picture shows at most.
PICTURE_EXAMPLES = 12


def xywh_to_xyxy(box: list[float] | tuple[float, ...]) -> Tensor:
    """COCO ``[x, y, w, h]`` -> (4,) float32 ``[x1, y1, x2, y2]``."""
    x, y, w, h = (float(v) for v in box)
    return torch.tensor([x, y, x + w, y + h], dtype=torch.float32)


def grounding_targets(
    pixel_boxes: Tensor, target_box: Tensor, threshold: float = 0.5, soft: bool = False
) -> tuple[Tensor, Tensor]:
    """``(targets (N,), iou (N,))`` for regions ``pixel_boxes`` (N, 4) (row 0 = whole image, never a target)."""
    from torchvision.ops import box_iou  # here: importing torchvision.ops costs every process 1.7 s

    iou = box_iou(pixel_boxes, target_box[None])[:, 0]
    hit = iou >= threshold
    hit[0] = False
    targets = torch.where(hit, iou if soft else torch.ones_like(iou), torch.zeros_like(iou))
    return targets, iou


@dataclass(frozen=True)
class RefCOCODataConfig:
    """Which refs and how a region counts as the referred one."""

    split: str = "train"
    """The refs' ``split`` (RefCOCO+: ``train``, ``val``, ``testA``, ``testB``)."""
    max_text_length: int = 20
    """Tokens per expression including [CLS] / [SEP] (the original: 20)."""
    iou_threshold: float = 0.5
    """A region is a target when its IoU with the referred box is at least this."""
    soft_targets: bool = False
    """Targets = the IoU (above the threshold) instead of 1, as the original code."""
    skip_missing_images: bool = False
    """Drop refs whose image has no features (counted) instead of raising."""

    def __post_init__(self) -> None:
        if self.max_text_length < 3:
            raise ValueError(f"max_text_length must be >= 3, got {self.max_text_length}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must lie in (0, 1], got {self.iou_threshold}")


class RefCOCODataset(EpochItems, Dataset):
    """(expression, image) items with region targets; see the module docstring.

    ``report`` counts refs (a ref expands to one item per sentence; ``len(self)`` counts sentences).
    ``items_without_target`` counts sentences whose image has no region reaching the IoU threshold (they
    contribute no loss; accuracy on them is 0 unless the whole image is chosen and fits)."""

    def __init__(
        self, files: TaskFiles, regions: RegionSource, tokenizer: Any, config: RefCOCODataConfig | None = None
    ):
        self.config = config = config or RefCOCODataConfig()
        check_tokenizer(tokenizer, regions.config)
        self.tokenizer, self.regions = tokenizer, regions
        refs = files.read_json(REFS_FILE)
        if not isinstance(refs, list):
            raise DataError(f"{files.path(REFS_FILE)} must hold the list of refs")
        boxes = {
            str(a["id"]): a["bbox"]
            for a in files.read_json(INSTANCES_FILE).get("annotations", [])
            if isinstance(a, dict) and "id" in a and "bbox" in a
        }
        rejected_refs, rejected_anns = files.rejected("refcoco+_refs"), files.rejected("refcoco+_instances")
        refs = [r for r in refs if isinstance(r, dict) and r.get("split") == config.split]
        self.report = DatasetReport(rows=len(refs))
        kept = []
        for ref in refs:
            ann = str(ref.get("ann_id"))
            if str(ref.get("ref_id")) in rejected_refs or ann in rejected_anns:
                self.report.drop("rejected")
            elif ann not in boxes:
                self.report.drop("unknown_annotation")
            elif not ref.get("sentences"):
                self.report.drop("no_sentences")
            else:
                kept.append(ref)
        image_ids = [files.image_id(r.get("image_id")) for r in kept]
        keep, missing = _require_features(image_ids, regions, config.skip_missing_images, "RefCOCO+ ref")
        self.report.drop("missing_features", missing)
        self.items: list[dict[str, Any]] = []
        for ref, image_id, ok in zip(kept, image_ids, keep, strict=True):
            if not ok:
                continue
            self.report.kept += 1
            box = xywh_to_xyxy(boxes[str(ref["ann_id"])])
            for sent in ref["sentences"]:
                text = sent.get("raw") or sent.get("sent") if isinstance(sent, dict) else str(sent)
                sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
                self.items.append(
                    {"ref_id": ref["ref_id"], "sent_id": sent_id, "text": text, "image_id": image_id, "box": box}
                )
        non_empty(len(self.items), "RefCOCO+ refs", config.split, self.report)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        _, index = self._key(key, len(self))
        item = self.items[index]
        cfg = self.config
        text = encode_text(self.tokenizer, item["text"], cfg.max_text_length)
        regions = self.regions[item["image_id"]]
        targets, iou = grounding_targets(regions.pixel_boxes, item["box"], cfg.iou_threshold, cfg.soft_targets)
        return {
            "input_ids": text["input_ids"],
            "token_type_ids": text["token_type_ids"],
            "attention_mask": text["attention_mask"],
            "features": regions.features,
            "boxes": regions.boxes,
            "region_mask": regions.region_mask,
            "labels": {"grounding_targets": targets},
            "meta": {
                "ref_id": item["ref_id"],
                "sent_id": item["sent_id"],
                "image_id": item["image_id"],
                "target_box": item["box"],
                "pixel_boxes": regions.pixel_boxes,
                "region_iou": iou,
            },
        }

    def items_without_target(self) -> int:
        """Sentences whose image has no region with IoU >= the threshold (reads every item's regions)."""
        return sum(
            int(
                grounding_targets(self.regions[it["image_id"]].pixel_boxes, it["box"], self.config.iou_threshold)[
                    0
                ].sum()
                == 0
            )
            for it in self.items
        )


def grounding_loss_of(output: Any, batch: dict[str, Any]) -> Tensor:
    """``grounding_loss`` of ``region_logits`` (B, N, 1) against ``labels["grounding_targets"]`` (B, N)."""
    return grounding_loss(output.region_logits.squeeze(-1), batch["labels"]["grounding_targets"], batch["region_mask"])


def grounding_hits(region_logits: Tensor, batch: dict[str, Any], threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """``(hit (B,) bool, chosen box (B, 4))``: the highest-scoring real region other than region 0, and whether
    its IoU with ``meta["target_box"]`` reaches ``threshold`` (the RefCOCO+ accuracy)."""
    logits = region_logits.squeeze(-1).detach().float().cpu().clone()  # (B, N)
    mask = batch["region_mask"].detach().cpu().bool().clone()
    mask[:, 0] = False
    chosen = logits.masked_fill(~mask, float("-inf")).argmax(-1)  # (B,)
    boxes = batch["meta"]["pixel_boxes"][torch.arange(len(chosen)), chosen]  # (B, 4)
    from torchvision.ops import box_iou

    iou = box_iou(boxes, batch["meta"]["target_box"]).diagonal()
    return iou >= threshold, boxes


def chosen_regions(region_logits: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(chosen (B,), probability (B,))``: the best real region other than region 0 and its softmax over them."""
    logits = region_logits.squeeze(-1).detach().float().cpu()  # (B, N)
    allowed = region_mask.detach().cpu().bool().clone()
    allowed[:, 0] = False  # the whole-image token is never the answer
    masked = logits.masked_fill(~allowed, float("-inf"))
    chosen = masked.argmax(-1)
    return chosen, torch.softmax(masked, -1).gather(1, chosen[:, None])[:, 0]


def _dataset(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, text_length: int, seed: int,
             vocab: Any = None) -> RefCOCODataset:  # fmt: skip
    return RefCOCODataset(files, regions, tokenizer, RefCOCODataConfig(split=split, max_text_length=text_length))


def _evaluation_data(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, length: dict[str, Any],
                     vocab: Any = None) -> RefCOCODataset:  # fmt: skip
    return RefCOCODataset(files, regions, tokenizer, RefCOCODataConfig(split=split, **length))


def _predict(run: PredictionRun) -> Predictions:
    """The highest-scoring real region other than region 0 (the whole image is never an answer, as
    :func:`grounding_hits`), its pixel box; score = its softmax over those regions."""
    records = []
    for indices, batch, out in run.batches():
        logits = out.region_logits.detach()
        allowed = batch["region_mask"].bool()
        finite(logits.squeeze(-1).cpu()[allowed], "region logits")
        chosen, probs = chosen_regions(logits, batch["region_mask"])
        meta = batch["meta"]
        for row, index in enumerate(indices):
            item = run.dataset.items[index]
            real = int(allowed[row].sum())
            records.append({
                "ref_id": item["ref_id"],
                "sent_id": item["sent_id"],
                "image_id": item["image_id"],
                "expression": item["text"],
                "prediction": meta["pixel_boxes"][row, int(chosen[row])].tolist(),
                "target": meta["target_box"][row].tolist(),
                "region": int(chosen[row]),
                "score": float(probs[row]),
                # the best IoU any proposal reaches: the accuracy a perfect chooser would get on this expression
                "best_iou": float(meta["region_iou"][row, 1:real].max()),
                "num_candidates": real - 1,  # the regions a choice is made among (region 0 excluded)
            })  # fmt: skip
    return Predictions("refcoco+", records)


def _score(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    records = predictions.records
    # chance: one of the expression's candidate regions (region 0 excluded) at random, when predict recorded them
    regions = [r.get("num_candidates") for r in records]
    counts = [int(n) for n in regions if isinstance(n, int) and n > 0]
    result = grounding_scores(
        [r["prediction"] for r in records],
        [r["target"] for r in records],
        num_regions=counts if len(counts) == len(records) else None,
    )
    reachable = sum(r["best_iou"] >= IOU_THRESHOLD for r in records) / len(records)
    metrics = {
        METRIC: percent(result["accuracy"]),
        "grounding_upper_bound": percent(reachable),
        "mean_iou": float(result["mean_iou"]),
    }
    if result.get("chance") is not None:
        metrics["chance"] = percent(result["chance"])
    return metrics, [{"iou": i, "correct": c} for i, c in zip(result["iou"], result["correct"], strict=True)]


def _pictures(predictions: Predictions, images: Callable[[str], bytes], out_dir: Path, count: int) -> list[Path]:
    """Images with the predicted and the true box."""
    records = predictions.records
    examples = [pictures.GroundingExample(images(r["image_id"]), r["expression"], r["prediction"], r["target"])
                for r in (records[i] for i in spread(len(records), min(count, PICTURE_EXAMPLES)))]  # fmt: skip
    return [pictures.grounding_examples_png(out_dir, examples)]


def _serve(out: Any, batch: dict[str, Any], choices: list[tuple[str, ...]], vocab: Any,
           zero_shot: bool) -> list[dict[str, Any]]:  # fmt: skip
    logits = out.region_logits.squeeze(-1).float()  # (B, N)
    allowed = batch["region_mask"].bool().clone()
    allowed[:, 0] = False  # the whole-image token is not an answer (as the evaluation's grounding_hits)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    chosen = probs.argmax(-1)
    boxes = batch["meta"]["pixel_boxes"][torch.arange(len(chosen)), chosen]  # (B, 4) pixels
    return [
        {"box": [float(v) for v in box], "score": float(probs[b, i]), "region": int(i)}
        for b, (box, i) in enumerate(zip(boxes.tolist(), chosen.tolist(), strict=True))
    ]


REFCOCO_TASK = TaskSpec(
    name="refcoco+",
    heads=("region",),
    loss=grounding_loss_of,
    metric=METRIC,
    title="RefCOCO+",
    model_name="vilbert-refcoco-plus",
    files=(REFS_FILE, INSTANCES_FILE),
    text_length=20,
    dataset=_dataset,
    evaluation_data=_evaluation_data,
    predict=_predict,
    score=_score,
    pictures=_pictures,
    attention_inputs=functools.partial(item_attention_inputs, text_key="expression"),
    serving=ServingAdapter(
        outputs=(("box", "double[]"), ("score", "double"), ("region", "long")),
        example_text="the red circle",
        decode=_serve,
    ),
    blind="position",
)
