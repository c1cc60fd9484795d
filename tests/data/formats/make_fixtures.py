"""Regenerate the small real-format fixtures in this folder (deterministic; run from the repository root).

    .venv/bin/python tests/data/formats/make_fixtures.py

coco/                  COCO 2014 captions layout: annotations/captions_{train,val}2014.json + {train,val}2014/*.jpg
conceptual_captions/   Conceptual Captions TSVs (caption<TAB>url, no header) + images/<sha1(url)>.jpg|png
folder_csv/            a folder of images with captions.csv (image,caption,split)
folder_jsonl/          a folder of images with captions.jsonl ({"image", "caption"} per line, no split)
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def tiny(colour: str, fmt: str, size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    return buf.getvalue()


def coco() -> None:
    root = HERE / "coco"
    for split, ids in (("train", [9, 25, 30]), ("val", [42, 73])):
        name = f"{split}2014"
        images, annotations = [], []
        for n, image_id in enumerate(ids):
            file_name = f"COCO_{name}_{image_id:012d}.jpg"
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / file_name).write_bytes(tiny(COLOURS[(image_id + n) % len(COLOURS)], "JPEG"))
            images.append(
                {"license": 1, "file_name": file_name, "coco_url": f"http://images.cocodataset.org/{name}/{file_name}",
                 "height": 6, "width": 8, "date_captured": "2013-11-14 16:28:13",
                 "flickr_url": f"http://farm1.staticflickr.com/{image_id}.jpg", "id": image_id}
            )  # fmt: skip
            for k in range(2):
                ann_id = 1000 * image_id + k
                colour = COLOURS[(image_id + n) % len(COLOURS)]
                caption = f"A small {colour} square, seen from above." if k == 0 else f"A plain {colour} picture."
                annotations.append({"image_id": image_id, "id": ann_id, "caption": caption})
        doc = {
            "info": {"description": "tiny COCO-format fixture", "version": "1.0", "year": 2014},
            "images": images,
            "licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "Attribution"}],
            "annotations": annotations,
        }
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{name}.json").write_text(json.dumps(doc))


def conceptual_captions() -> None:
    root = HERE / "conceptual_captions"
    (root / "images").mkdir(parents=True, exist_ok=True)
    files = {
        "Train_GCC-training.tsv": [
            ("a red apple on a wooden table", "http://example.com/img/apple.jpg", "JPEG"),
            ("actor attends the premiere of the film", "https://example.org/photos/12345.png", "PNG"),
            ("a green field under a blue sky", "http://example.com/img/field.jpg", "JPEG"),
            ("the same apple , from another caption", "http://example.com/img/apple.jpg", "JPEG"),
            ("a picture that was never downloaded", "http://example.com/img/gone.jpg", None),
        ],
        "Validation_GCC-1.1.0-Validation.tsv": [
            ("a yellow taxi in the street", "http://example.net/taxi.jpg", "JPEG"),
        ],
    }
    for tsv, rows in files.items():
        lines = []
        for n, (caption, url, fmt) in enumerate(rows):
            lines.append(f"{caption}\t{url}")
            if fmt:
                name = hashlib.sha1(url.encode()).hexdigest() + (".png" if fmt == "PNG" else ".jpg")
                (root / "images" / name).write_bytes(tiny(COLOURS[n % len(COLOURS)], fmt))
        (root / tsv).write_text("\n".join(lines) + "\n")


def folders() -> None:
    csv_root = HERE / "folder_csv"
    (csv_root / "images").mkdir(parents=True, exist_ok=True)
    for name, colour, fmt in (
        ("cat.jpg", "orange", "JPEG"),
        ("dog.png", "green", "PNG"),
        ("bird.webp", "blue", "WEBP"),
    ):
        (csv_root / "images" / name).write_bytes(tiny(colour, fmt))
    (csv_root / "captions.csv").write_text(
        "image,caption,split\n"
        "images/cat.jpg,An orange cat sleeping.,train\n"
        'images/cat.jpg,"A cat, curled up.",train\n'
        "images/dog.png,A green dog?,val\n"
        "images/bird.webp,A blue bird.,test\n"
    )
    jsonl_root = HERE / "folder_jsonl"
    (jsonl_root / "photos").mkdir(parents=True, exist_ok=True)
    (jsonl_root / "photos" / "one.png").write_bytes(tiny("red", "PNG"))
    (jsonl_root / "photos" / "two.jpg").write_bytes(tiny("purple", "JPEG"))
    rows = [
        {"image": "photos/one.png", "caption": "Un carré rouge."},
        {"image": "photos/two.jpg", "caption": "A purple square.", "caption_id": "two-main"},
    ]
    (jsonl_root / "captions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    for sub in ("coco", "conceptual_captions", "folder_csv", "folder_jsonl"):
        shutil.rmtree(HERE / sub, ignore_errors=True)
    coco()
    conceptual_captions()
    folders()
