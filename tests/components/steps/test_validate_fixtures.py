"""Builders for small, real datasets in the ingest layout (Parquet, PNG files, task files in native formats).

Tests build a clean :class:`World`, break it on purpose, then :meth:`World.write` it to a tmp folder.
No code of ingest or the synthetic world is used, so these tests do not depend on those steps.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
    ]
)
CAPTIONS_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("image_id", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
    ]
)
SOURCE = "synthetic://test?seed=0"
W, H = 48, 40


def png_bytes(index: int, size: tuple[int, int] = (W, H)) -> bytes:
    """A distinct small PNG per index (so no two images share a sha256)."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def split_of(index: int) -> str:
    return ("train", "train", "train", "val", "test")[index % 5]


@dataclass
class World:
    """A dataset root, as Python objects: mutate them, then write."""

    files: dict[str, bytes] = field(default_factory=dict)
    manifest: list[dict[str, Any]] = field(default_factory=list)
    captions: list[dict[str, Any]] = field(default_factory=list)
    json_files: dict[str, Any] = field(default_factory=dict)
    jsonl_files: dict[str, list[Any]] = field(default_factory=dict)
    manifest_schema: pa.Schema = MANIFEST_SCHEMA
    captions_schema: pa.Schema = CAPTIONS_SCHEMA

    def write(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        pq.write_table(pa.Table.from_pylist(self.manifest, schema=self.manifest_schema), root / "manifest.parquet")
        pq.write_table(pa.Table.from_pylist(self.captions, schema=self.captions_schema), root / "captions.parquet")
        for rel, obj in self.json_files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(json.dumps(obj))
        for rel, lines in self.jsonl_files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
        return root

    def image_row(self, image_id: str) -> dict[str, Any]:
        return next(r for r in self.manifest if r["image_id"] == image_id)

    # task files, by name
    @property
    def vqa_questions(self) -> list[dict[str, Any]]:
        return self.json_files["tasks/vqa/v2_OpenEnded_mscoco_train2014_questions.json"]["questions"]

    @property
    def vqa_annotations(self) -> list[dict[str, Any]]:
        return self.json_files["tasks/vqa/v2_mscoco_train2014_annotations.json"]["annotations"]

    @property
    def refs(self) -> list[dict[str, Any]]:
        return self.json_files["tasks/refcoco+/refs(unc).json"]

    @property
    def ref_instances(self) -> list[dict[str, Any]]:
        return self.json_files["tasks/refcoco+/instances.json"]["annotations"]

    @property
    def flickr(self) -> list[dict[str, Any]]:
        return self.json_files["tasks/flickr30k/dataset_flickr30k.json"]["images"]

    @property
    def vcr_train(self) -> list[Any]:
        return self.jsonl_files["tasks/vcr/train.jsonl"]


def image_id(index: int) -> str:
    return f"syn-{index:06d}"


def make_world(n: int = 10, tasks: bool = True, captions_per_image: int = 2) -> World:
    """A clean world of ``n`` images: every check passes on it."""
    world = World()
    for i in range(n):
        data = png_bytes(i)
        rel = f"images/{image_id(i)}.png"
        world.files[rel] = data
        world.manifest.append(
            {
                "image_id": image_id(i),
                "path": rel,
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": W,
                "height": H,
                "format": "PNG",
                "mode": "RGB",
                "split": split_of(i),
                "source": SOURCE,
            }
        )
        for k in range(captions_per_image):
            world.captions.append(
                {
                    "caption_id": f"{image_id(i)}-c{k}",
                    "image_id": image_id(i),
                    "caption": f"a small red square above {k + 1} blue circles",
                    "split": split_of(i),
                    "source": SOURCE,
                }
            )
    if tasks:
        _add_tasks(world, n)
    return world


def _add_tasks(world: World, n: int) -> None:
    coco_images = [{"id": i, "file_name": f"{image_id(i)}.png", "width": W, "height": H} for i in range(n)]
    anns = [
        {"id": i * 100 + k + 1, "image_id": i, "category_id": 1 + k, "bbox": [2.0 + k, 3.0, 10.0, 12.0], "area": 120}
        for i in range(n)
        for k in range(2)
    ]
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    world.json_files["annotations/instances.json"] = {
        "images": coco_images,
        "annotations": anns,
        "categories": categories,
    }
    world.json_files["tasks/refcoco+/instances.json"] = json.loads(
        json.dumps({"images": coco_images, "annotations": anns, "categories": categories})
    )
    world.json_files["tasks/refcoco+/refs(unc).json"] = [
        {
            "ref_id": i,
            "ann_id": i * 100 + 1,
            "image_id": i,
            "split": split_of(i),
            "category_id": 1,
            "file_name": f"COCO_train2014_{i:012d}_{i * 100 + 1}.jpg",
            "sentences": [{"raw": "the circle on the left", "sent": "the circle on the left", "sent_id": i}],
            "sent_ids": [i],
        }
        for i in range(n)
    ]
    train = [i for i in range(n) if split_of(i) == "train"]
    val = [i for i in range(n) if split_of(i) != "train"]
    for split, ids in (("train2014", train), ("val2014", val)):
        world.json_files[f"tasks/vqa/v2_OpenEnded_mscoco_{split}_questions.json"] = {
            "data_subtype": split,
            "questions": [
                {"image_id": i, "question": "What colour is the circle?", "question_id": i * 10} for i in ids
            ],
        }
        world.json_files[f"tasks/vqa/v2_mscoco_{split}_annotations.json"] = {
            "annotations": [
                {
                    "question_id": i * 10,
                    "image_id": i,
                    "multiple_choice_answer": "red",
                    "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": a + 1} for a in range(10)],
                }
                for i in ids
            ]
        }
    world.json_files["tasks/flickr30k/dataset_flickr30k.json"] = {
        "dataset": "flickr30k",
        "images": [
            {
                "imgid": i,
                "filename": f"{image_id(i)}.png",
                "split": split_of(i),
                "sentids": [5 * i + k for k in range(5)],
                "sentences": [{"raw": f"a picture with {k} shapes", "sentid": 5 * i + k, "imgid": i} for k in range(5)],
            }
            for i in range(n)
        ],
    }
    for split, ids in (("train", train), ("val", val)):
        world.jsonl_files[f"tasks/vcr/{split}.jsonl"] = [
            {
                "annot_id": f"{split}-{i}",
                "img_fn": f"images/{image_id(i)}.png",
                "objects": ["circle", "square"],
                "question": ["Why", "is", [0], "next", "to", [1], "?"],
                "answer_choices": [["Because", "it", "is", "red"], ["No"], [[1], "moved"], ["It", "fell"]],
                "answer_label": i % 4,
            }
            for i in ids
        ]
