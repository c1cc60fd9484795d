"""The synthetic world's files, each in the real dataset's own format (see components/DATA_CONTRACTS.md).

COCO-style files use the image index as the integer image id and ``<image_id>.png`` (``syn-000123.png``)
as the file name, which is where ingest stores the image.  Split names are ``train``, ``val``, ``test``
everywhere (the real datasets' ``train2014`` / ``testA`` ... have no meaning here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from components.sources.synthetic_tasks import ImageTasks
from components.sources.synthetic_text import tokenize
from components.sources.synthetic_world import Scene, coco_annotations, coco_categories, coco_image, image_id_of

SPLITS = ("train", "val", "test")
LICENSE = {"id": 1, "name": "CC0 1.0 (generated data)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


@dataclass
class WorldRecord:
    """One generated image's ground truth and language items."""

    scene: Scene
    split: str
    tasks: ImageTasks


def _info(uri: str, what: str) -> dict[str, Any]:
    return {"description": f"Synthetic shapes world, {what} ({uri})", "version": "1.0", "contributor": "vilbert-mlops"}


def coco_instances(records: list[WorldRecord], uri: str) -> dict[str, Any]:
    """COCO instances: images, annotations (bbox, area, RLE of the visible part, attributes), categories."""
    return {
        "info": _info(uri, "COCO instances"),
        "licenses": [LICENSE],
        "images": [coco_image(r.scene) for r in records],
        "annotations": [a for r in records for a in coco_annotations(r.scene)],
        "categories": coco_categories(),
    }


def coco_captions(records: list[WorldRecord], uri: str) -> dict[str, Any]:
    """The pretraining captions in COCO captions format, plus their ground truth: ``mentions`` (annotation
    ids) and ``wrong`` (null, or the false part: kind, ann_id, what was said, what is true)."""
    annotations = [
        {"id": r.scene.index * 100 + c, "image_id": r.scene.index, **caption}
        for r in records
        for c, caption in enumerate(r.tasks.captions)
    ]
    return {
        "info": _info(uri, "pretraining captions"),
        "licenses": [LICENSE],
        "images": [coco_image(r.scene) for r in records],
        "annotations": annotations,
    }


def vqa_files(records: list[WorldRecord], split: str, uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """VQA v2 ``(questions, annotations)`` file contents for one split."""
    chosen = [r for r in records if r.split == split]
    license_ = {"name": LICENSE["name"], "url": LICENSE["url"]}
    questions = {
        "info": _info(uri, "VQA v2 questions"),
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": split,
        "questions": [
            {"image_id": r.scene.index, "question": q["question"], "question_id": q["question_id"]}
            for r in chosen
            for q in r.tasks.vqa
        ],
        "license": license_,
    }
    annotations = {
        "info": _info(uri, "VQA v2 annotations"),
        "license": license_,
        "data_subtype": split,
        "data_type": "mscoco",
        "annotations": [
            {
                "question_type": q["question_type"],
                "multiple_choice_answer": q["multiple_choice_answer"],
                "answers": q["answers"],
                "image_id": r.scene.index,
                "answer_type": q["answer_type"],
                "question_id": q["question_id"],
            }
            for r in chosen
            for q in r.tasks.vqa
        ],
    }
    return questions, annotations


def refcoco_files(records: list[WorldRecord], uri: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """RefCOCO+ ``(instances.json, refs(unc) list)``: the COCO instances of the images that have refs."""
    chosen = [r for r in records if r.tasks.refs]
    instances = coco_instances(chosen, uri)
    instances["info"] = _info(uri, "RefCOCO+ instances")
    refs = [
        {**ref, "image_id": r.scene.index, "split": r.split, "file_name": f"{r.scene.image_id}.png"}
        for r in chosen
        for ref in r.tasks.refs
    ]
    return instances, refs


def flickr_file(records: list[WorldRecord]) -> dict[str, Any]:
    """Flickr30k in Karpathy's split format; near-duplicate distractors carry ``near_duplicate_of`` / ``change``."""
    images = []
    for imgid, r in enumerate(records):
        sentences = [
            {"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": imgid * 5 + s}
            for s, raw in enumerate(r.tasks.flickr)
        ]
        entry: dict[str, Any] = {
            "sentids": [s["sentid"] for s in sentences],
            "imgid": imgid,
            "sentences": sentences,
            "split": r.split,
            "filename": f"{r.scene.image_id}.png",
        }
        if r.scene.base_index is not None:
            entry["near_duplicate_of"] = f"{image_id_of(r.scene.base_index)}.png"
            entry["change"] = r.scene.change
        images.append(entry)
    return {"images": images, "dataset": "flickr30k"}


def vcr_lines(records: list[WorldRecord], split: str) -> list[dict[str, Any]]:
    """VCR Q->A rows for one split (the question and answers as plain strings)."""
    rows: list[dict[str, Any]] = []
    for r in (r for r in records if r.split == split):
        for number, item in enumerate(r.tasks.vcr):
            rows.append(
                {
                    "annot_id": f"{split}-{len(rows)}",
                    "img_id": r.scene.image_id,
                    "img_fn": f"{r.scene.image_id}.png",
                    "objects": [o.shape for o in r.scene.objects],
                    "question_number": number,
                    "question": item["question"],
                    "answer_choices": item["answer_choices"],
                    "answer_label": item["answer_label"],
                    "question_type": item["kind"],
                }
            )
    return rows


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def native_files(records: list[WorldRecord], uri: str) -> dict[PurePosixPath, bytes]:
    """Every ground-truth and task file, keyed by its path under the dataset root."""
    files = {
        PurePosixPath("annotations/instances.json"): _json(coco_instances(records, uri)),
        PurePosixPath("annotations/captions.json"): _json(coco_captions(records, uri)),
        PurePosixPath("tasks/flickr30k/dataset_flickr30k.json"): _json(flickr_file(records)),
    }
    instances, refs = refcoco_files(records, uri)
    files[PurePosixPath("tasks/refcoco+/instances.json")] = _json(instances)
    files[PurePosixPath("tasks/refcoco+/refs(unc).json")] = _json(refs)
    for split in SPLITS:
        questions, annotations = vqa_files(records, split, uri)
        files[PurePosixPath(f"tasks/vqa/v2_OpenEnded_mscoco_{split}_questions.json")] = _json(questions)
        files[PurePosixPath(f"tasks/vqa/v2_mscoco_{split}_annotations.json")] = _json(annotations)
        lines = [json.dumps(row, ensure_ascii=False) for row in vcr_lines(records, split)]
        files[PurePosixPath(f"tasks/vcr/{split}.jsonl")] = ("\n".join(lines) + "\n" if lines else "").encode("utf-8")
    return files
