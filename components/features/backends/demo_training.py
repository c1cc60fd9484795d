"""Training and evaluation of the ``demo`` detector on the dataset's COCO instances (with attributes).

Training examples are region proposals labelled like Fast R-CNN's: a proposal overlapping a ground-truth
object with IoU >= 0.5 takes that object's class and attributes, one under 0.4 is background, the rest
are ignored; the ground-truth boxes and jittered copies of them are added as positives.  The held-out
images (split ``val``, else ``test``, else the last fifth of ``train``) measure what matters for the
features: box recall at IoU 0.5 of the kept regions and of the confident detections, and how often the
class of a ground-truth box is right.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from components.features.backends.base import (
    BackendError,
    BoxLimits,
    PrepareContext,
    box_iou_matrix,
    box_recall,
    decode_rgb,
    read_images,
)
from components.features.backends.demo_proposals import propose

if TYPE_CHECKING:
    import pandas as pd

    from components.features.backends.demo import DemoDetector, DemoOptions

INSTANCES = "annotations/instances.json"
POSITIVE_IOU, NEGATIVE_IOU = 0.5, 0.4
ROIS_PER_IMAGE = 32


@dataclass
class AnnotatedImage:
    """A decoded image with its ground truth in the detector's label space."""

    image_id: str
    image: np.ndarray
    """RGB uint8 [H, W, 3], as the network sees it (after ``max_side``)."""
    boxes: np.ndarray
    """[G, 4] pixel x1, y1, x2, y2."""
    classes: np.ndarray
    """[G] class index (>= 1)."""
    attributes: np.ndarray
    """[G, A] multi-hot attribute targets."""


def build_vocabulary(instances: dict, num_classes: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Class names (background, then "<first attribute> <category>" pairs, padded to C) and attribute names."""
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    pairs: set[tuple[int, str]] = set()
    attributes: set[str] = set()
    for ann in instances.get("annotations", []):
        attrs = ann.get("attributes") or []
        pairs.add((ann["category_id"], attrs[0] if attrs else ""))
        attributes.update(attrs)
    classes = [f"{attr} {names.get(cid, cid)}".strip() for cid, attr in sorted(pairs)]
    if not classes:
        raise BackendError(f"the demo detector needs object annotations; {INSTANCES} has none")
    if len(classes) + 1 > num_classes:
        raise BackendError(f"{len(classes)} object classes + background do not fit num_classes={num_classes}")
    padding = [f"unused-{k}" for k in range(num_classes - 1 - len(classes))]
    return ("background", *classes, *padding), tuple(sorted(attributes))


def label_of(ann: dict, names: dict[int, str]) -> str:
    attrs = ann.get("attributes") or []
    return f"{attrs[0] if attrs else ''} {names.get(ann['category_id'], ann['category_id'])}".strip()


def _coco_lookup(instances: dict) -> dict[str, dict]:
    """COCO image entries by every name a manifest row may use for them: id, file stem, file name."""
    lookup: dict[str, dict] = {}
    for img in instances.get("images", []):
        name = PurePosixPath(str(img.get("file_name", "")))
        for key in (str(img["id"]), name.stem, name.name):
            lookup.setdefault(key, img)
    return lookup


def load_annotated(
    ctx: PrepareContext, rows: pd.DataFrame, instances: dict, detector: DemoDetector
) -> tuple[list[AnnotatedImage], int]:
    """Decode ``rows`` and attach their ground truth; returns the images and how many rows were unusable."""
    from components import storage

    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    class_index = {name: i for i, name in enumerate(detector.arch.classes)}
    attr_index = {name: i for i, name in enumerate(detector.arch.attributes)}
    coco = _coco_lookup(instances)
    by_image: dict[Any, list[dict]] = {}
    for ann in instances.get("annotations", []):
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    out, unusable = [], 0
    rows = rows.reset_index(drop=True)
    uris = [storage.child(ctx.dataset, p) for p in rows["path"]]
    for (_, row), data in zip(rows.iterrows(), read_images(uris), strict=True):
        entry = coco.get(row["image_id"]) or coco.get(PurePosixPath(row["path"]).name)
        if entry is None or isinstance(data, Exception):
            unusable += 1
            continue
        try:
            image = decode_rgb(data)
        except Exception:
            unusable += 1
            continue
        shown, scale = detector.prepare_image(image)
        anns = by_image.get(entry["id"], [])
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32).reshape(-1, 4)
        attrs = np.zeros((len(anns), len(attr_index)), np.float32)
        for k, a in enumerate(anns):
            for name in a.get("attributes") or []:
                attrs[k, attr_index[name]] = 1.0
        classes = np.array([class_index[label_of(a, names)] for a in anns], dtype=np.int64)
        out.append(AnnotatedImage(str(row["image_id"]), shown, boxes / scale, classes, attrs))
    return out, unusable


def _jitter(boxes: np.ndarray, rng: np.random.Generator, amount: float = 0.1) -> np.ndarray:
    wh = np.repeat(boxes[:, 2:] - boxes[:, :2], 2, axis=0)
    base = np.repeat(boxes, 2, axis=0)
    shift = rng.uniform(-amount, amount, base.shape) * np.concatenate([wh, wh], axis=1)
    return (base + shift).astype(np.float32)


@dataclass
class _Candidates:
    """Labelled training regions of one image (positives first)."""

    boxes: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    positives: int


def label_regions(sample: AnnotatedImage, proposals: np.ndarray, rng: np.random.Generator) -> _Candidates:
    """Proposals + ground truth + jittered ground truth, each labelled by its best-overlapping object."""
    height, width = sample.image.shape[:2]
    boxes = np.concatenate([sample.boxes, _jitter(sample.boxes, rng), proposals]).astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)]
    if len(sample.boxes) == 0:
        empty = np.zeros((len(boxes), sample.attributes.shape[1]), np.float32)
        return _Candidates(boxes, np.zeros(len(boxes), np.int64), empty, 0)
    iou = box_iou_matrix(boxes, sample.boxes)
    best, match = iou.max(axis=1), iou.argmax(axis=1)
    positive, negative = best >= POSITIVE_IOU, best < NEGATIVE_IOU
    order = np.concatenate([np.flatnonzero(positive), np.flatnonzero(negative)])
    labels = np.where(positive, sample.classes[match], 0)[order]
    return _Candidates(boxes[order], labels, sample.attributes[match][order], int(positive.sum()))


def _sample_rois(c: _Candidates, rng: np.random.Generator) -> np.ndarray:
    """Indices: up to half the RoIs positive, the rest background."""
    pos = rng.permutation(c.positives)[: ROIS_PER_IMAGE // 2]
    neg = c.positives + rng.permutation(len(c.labels) - c.positives)[: ROIS_PER_IMAGE - len(pos)]
    return np.concatenate([pos, neg])


def train_demo_detector(ctx: PrepareContext, options: DemoOptions) -> tuple[DemoDetector, dict[str, Any]]:
    """Train a demo detector on the dataset's training images; returns it and the training + held-out report."""
    from components import storage
    from components.features.backends.demo import DemoArchitecture, DemoDetector

    start = time.perf_counter()
    torch.manual_seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    try:
        instances = json.loads(storage.read_bytes(storage.join(ctx.dataset, INSTANCES)))
    except storage.ObjectNotFound:
        raise BackendError(f"the demo detector trains on {INSTANCES}, which {ctx.dataset} lacks") from None
    classes, attributes = build_vocabulary(instances, options.num_classes)
    arch = DemoArchitecture(
        classes,
        attributes,
        options.feature_size,
        options.channels,
        options.crop_size,
        options.max_side,
        options.proposals,
    )
    detector = DemoDetector(arch, device=ctx.device)
    train_rows, held_rows = _split_rows(ctx.manifest, options)
    train, bad_train = load_annotated(ctx, train_rows, instances, detector)
    held, bad_held = load_annotated(ctx, held_rows, instances, detector)
    if not train:
        raise BackendError(f"no usable annotated training images in {ctx.dataset}")
    ctx.log(f"demo: training on {len(train)} images, {len(held)} held out, {len(classes)} classes")
    candidates = [label_regions(s, propose(s.image, arch.proposals), rng) for s in train]
    threads = torch.get_num_threads()
    torch.set_num_threads(options.train_threads)
    try:
        losses = _fit(detector, train, candidates, options, rng, ctx)
    finally:
        torch.set_num_threads(threads)
    report: dict[str, Any] = {
        "train_images": len(train),
        "train_images_unusable": bad_train,
        "train_objects": int(sum(len(s.boxes) for s in train)),
        "epochs": options.epochs,
        "steps": len(losses),
        "loss_first_epoch": float(np.mean(losses[: max(1, len(losses) // options.epochs)])),
        "loss_last_epoch": float(np.mean(losses[-max(1, len(losses) // options.epochs) :])),
        "object_classes": sum(not c.startswith("unused-") for c in classes) - 1,
        "train_seconds": round(time.perf_counter() - start, 2),
        "held_out_images": len(held),
        "held_out_images_unusable": bad_held,
    }
    report.update(evaluate(detector, held, ctx.limits))
    ctx.log("demo: " + ", ".join(f"{k}={v:.3f}" for k, v in report.items() if isinstance(v, float)))
    return detector, report


def _split_rows(manifest: pd.DataFrame, options: DemoOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows (split train) and held-out rows (val, else test, else the last fifth of train)."""
    ordered = manifest.sort_values("image_id", kind="stable")
    train = ordered[ordered["split"] == "train"]
    for split in ("val", "test"):
        held = ordered[ordered["split"] == split]
        if len(held):
            return train.head(options.train_images), held.head(options.eval_images)
    cut = max(1, len(train) // 5) if len(train) > 1 else 0
    held, train = train.tail(cut), train.head(len(train) - cut)
    return train.head(options.train_images), held.head(options.eval_images)


def _fit(
    detector: DemoDetector,
    train: list[AnnotatedImage],
    candidates: list[_Candidates],
    options: DemoOptions,
    rng: np.random.Generator,
    ctx: PrepareContext,
) -> list[float]:
    """AdamW with cosine decay; batches hold images of one size.  Returns the loss of every step."""
    net = detector.net.train()
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(train):
        groups.setdefault(s.image.shape, []).append(i)
    steps_per_epoch = sum(math.ceil(len(g) / options.batch_images) for g in groups.values())
    total = steps_per_epoch * options.epochs
    optimizer = torch.optim.AdamW(net.parameters(), lr=options.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    losses: list[float] = []
    for epoch in range(options.epochs):
        batches = [
            perm[k : k + options.batch_images]
            for g in groups.values()
            for perm in [list(rng.permutation(g))]
            for k in range(0, len(g), options.batch_images)
        ]
        for b in rng.permutation(len(batches)):
            members = batches[b]
            picks = [_sample_rois(candidates[i], rng) for i in members]
            images = torch.stack(
                [torch.from_numpy(np.ascontiguousarray(train[i].image)).permute(2, 0, 1) for i in members]
            ).float()
            boxes = [torch.from_numpy(candidates[i].boxes[p]) for i, p in zip(members, picks, strict=True)]
            labels = torch.from_numpy(
                np.concatenate([candidates[i].labels[p] for i, p in zip(members, picks, strict=True)])
            )
            attrs = torch.from_numpy(
                np.concatenate([candidates[i].attributes[p] for i, p in zip(members, picks, strict=True)])
            )
            _, logits, attr_logits = net(images.to(detector.device), [b.to(detector.device) for b in boxes])
            loss = F.cross_entropy(logits, labels.to(detector.device))
            fg = labels > 0
            if fg.any() and attrs.shape[1]:
                loss = loss + F.binary_cross_entropy_with_logits(attr_logits[fg], attrs[fg].to(detector.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        ctx.log(f"demo: epoch {epoch + 1}/{options.epochs} loss {np.mean(losses[-len(batches) :]):.3f}")
    net.eval()
    return losses


@torch.inference_mode()
def evaluate(detector: DemoDetector, held: list[AnnotatedImage], limits: BoxLimits) -> dict[str, float | None]:
    """Box recall at IoU 0.5 (proposals, kept regions, confident detections), precision and class accuracy."""
    if not held:
        return {"box_recall_at_0_5": None}
    detections = detector.detect([s.image for s in held], limits)
    truth = [s.boxes for s in held]
    confident = [d.regions.boxes[d.scores >= limits.conf_threshold] for d in detections]
    matched = total = correct = 0
    for d, s in zip(detections, held, strict=True):
        if not len(s.boxes):
            continue
        iou = box_iou_matrix(s.boxes, d.regions.boxes)
        best = iou.argmax(axis=1)
        ok = iou.max(axis=1) >= 0.5
        predicted = d.regions.class_probs[best].argmax(axis=1)
        correct += int((ok & (predicted == s.classes)).sum())
        matched += int(ok.sum())
        total += len(s.boxes)
    hits = sum(
        int((box_iou_matrix(c, s.boxes).max(axis=1) >= 0.5).sum()) if len(c) and len(s.boxes) else 0
        for c, s in zip(confident, held, strict=True)
    )
    n_conf = sum(len(c) for c in confident)
    gt_accuracy = _ground_truth_accuracy(detector, held)
    return {
        "box_recall_at_0_5": box_recall([d.regions.boxes for d in detections], truth),
        "proposal_recall_at_0_5": box_recall([d.proposals for d in detections], truth),
        "detection_recall_at_0_5": box_recall(confident, truth),
        "detection_precision_at_0_5": hits / n_conf if n_conf else None,
        "region_class_accuracy": correct / total if total else None,
        "gt_box_class_accuracy": gt_accuracy[0],
        "gt_box_attribute_accuracy": gt_accuracy[1],
        "mean_regions": float(np.mean([len(d.regions.boxes) for d in detections])),
        "mean_detections": n_conf / len(held),
        "mean_objects": float(np.mean([len(s.boxes) for s in held])),
    }


def _ground_truth_accuracy(detector: DemoDetector, held: list[AnnotatedImage]) -> tuple[float | None, float | None]:
    """Class and attribute accuracy of the network on the ground-truth boxes themselves."""
    correct = attr_correct = attr_total = total = 0
    for s in held:
        if not len(s.boxes):
            continue
        image = torch.from_numpy(s.image).permute(2, 0, 1)[None].float().to(detector.device)
        _, logits, attr_logits = detector.net(image, [torch.from_numpy(s.boxes).to(detector.device)])
        correct += int((logits.argmax(dim=1).cpu().numpy() == s.classes).sum())
        total += len(s.boxes)
        if s.attributes.shape[1]:
            attr_correct += int(((attr_logits.cpu().numpy() > 0) == (s.attributes > 0.5)).sum())
            attr_total += s.attributes.size
    return (correct / total if total else None), (attr_correct / attr_total if attr_total else None)
