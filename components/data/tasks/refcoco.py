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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from components.data.common import DataError, DatasetReport, EpochItems, check_tokenizer, encode_text, non_empty
from components.data.common import require_features as _require_features
from components.data.regions import RegionSource
from components.data.tasks.common import TaskFiles, TaskSpec
from model.losses import grounding_loss

REFS_FILE = "tasks/refcoco+/refs(unc).json"
INSTANCES_FILE = "tasks/refcoco+/instances.json"


def xywh_to_xyxy(box: list[float] | tuple[float, ...]) -> Tensor:
    """COCO ``[x, y, w, h]`` -> (4,) float32 ``[x1, y1, x2, y2]``."""
    x, y, w, h = (float(v) for v in box)
    return torch.tensor([x, y, x + w, y + h], dtype=torch.float32)


def grounding_targets(
    pixel_boxes: Tensor, target_box: Tensor, threshold: float = 0.5, soft: bool = False
) -> tuple[Tensor, Tensor]:
    """``(targets (N,), iou (N,))`` for regions ``pixel_boxes`` (N, 4) (row 0 = whole image, never a target)."""
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
    iou = box_iou(boxes, batch["meta"]["target_box"]).diagonal()
    return iou >= threshold, boxes


REFCOCO_TASK = TaskSpec(name="refcoco+", heads=("region",), loss=grounding_loss_of, metric="grounding_accuracy",
                        blind="position")  # fmt: skip
