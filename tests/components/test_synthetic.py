"""The synthetic world: URI and config validation, determinism, ground truth vs pixels, splits, the Source."""

from __future__ import annotations

import io
import json
import re
from pathlib import PurePosixPath

import numpy as np
import pytest
from PIL import Image

from components.sources import synthetic
from components.sources.base import SourceCaption, SourceImage
from components.sources.synthetic import (
    SyntheticConfig,
    SyntheticConfigError,
    SyntheticSource,
    generate_image,
    generate_records,
    generate_world,
)
from components.sources.synthetic_world import COLOURS, SHAPES

URI = "synthetic://shapes?seed=3&n=40&size=96"


@pytest.fixture(scope="module")
def source() -> SyntheticSource:
    return SyntheticSource(URI)


@pytest.fixture(scope="module")
def images(source) -> list[SourceImage]:
    return list(source.images())


@pytest.fixture(scope="module")
def instances(source) -> dict:
    return json.loads(source.native_files().files[PurePosixPath("annotations/instances.json")])


def decode_rle(segmentation: dict) -> np.ndarray:
    """COCO uncompressed RLE -> boolean mask (written here independently of the generator)."""
    height, width = segmentation["size"]
    flat = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in segmentation["counts"]:
        flat[position : position + run] = value
        position, value = position + run, not value
    assert position == height * width, "RLE counts must cover the image exactly"
    return flat.reshape((height, width), order="F")


# ---------------------------------------------------------------- URI and config


def test_uri_parses_into_config():
    config = SyntheticConfig.from_uri("synthetic://shapes?seed=7&n=120&size=64&caption_wrong_fraction=0.25")
    assert (config.seed, config.n, config.size, config.caption_wrong_fraction) == (7, 120, 64, 0.25)
    assert config.questions_per_image == SyntheticConfig().questions_per_image  # unspecified -> default
    assert SyntheticConfig.from_uri("synthetic://shapes") == SyntheticConfig()
    assert SyntheticConfig.from_uri(config.to_uri()) == config


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("synthetic://shapes?seed=0&colour=red", r"unknown parameter 'colour'.*known parameters: seed, n, size"),
        ("synthetic://shapes?n=10&n=20", r"'n' is given twice"),
        ("synthetic://shapes?n=abc", r"'n' must be an integer, got 'abc'"),
        ("synthetic://shapes?n=3.5", r"'n' must be an integer"),
        ("synthetic://shapes?n=", r"'n' must be an integer, got ''"),
        ("synthetic://shapes?answer_noise=high", r"'answer_noise' must be a number"),
        ("synthetic://shapes?answer_noise=nan", r"'answer_noise' must be a finite number"),
        ("synthetic://shapes?size=10", r"size must be in \[32, 1024\]"),
        ("synthetic://shapes?min_objects=5&max_objects=3", r"max_objects must be in \[min_objects=5, 10\]"),
        ("synthetic://shapes?val_fraction=0.6&test_fraction=0.5", r"leave no training image"),
        ("synthetic://shapes?n=5&val_fraction=0.01", r"val_fraction=0.01 of n=5 rounds to no val image"),
        ("synthetic://animals?n=3", r"unknown synthetic world 'animals'"),
        ("file://shapes?n=3", r"scheme must be 'synthetic://'"),
        ("synthetic://shapes/extra?n=3", r"only a world and \?parameters"),
        ("synthetic://shapes?n", r"malformed query"),
    ],
)
def test_bad_uris_are_clear_errors(uri, message):
    with pytest.raises(SyntheticConfigError, match=message):
        SyntheticConfig.from_uri(uri)


def test_config_is_validated_when_built():
    with pytest.raises(SyntheticConfigError, match="seed must be an integer"):
        SyntheticConfig(seed=True)  # type: ignore[arg-type]
    with pytest.raises(SyntheticConfigError, match=r"min_visible must be in \[0.3, 1\]"):
        SyntheticConfig(min_visible=0.1)
    with pytest.raises(SyntheticConfigError, match=r"questions_per_image must be in \[0, 99\]"):
        SyntheticConfig(questions_per_image=100)


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_different_seed_different_bytes():
    config = SyntheticConfig.from_uri(URI)
    first, again = generate_image(config, 5), generate_image(config, 5)
    assert first.png == again.png and first.annotations == again.annotations
    other_seed = generate_image(SyntheticConfig.from_uri(URI.replace("seed=3", "seed=4")), 5)
    assert other_seed.png != first.png
    assert generate_image(config, 6).png != first.png
    # an image does not depend on the world's size: image 5 of a larger world is the same picture
    assert generate_image(SyntheticConfig.from_uri(URI.replace("n=40", "n=400")), 5).png == first.png


def test_image_index_outside_the_world_is_refused():
    config = SyntheticConfig.from_uri(URI)
    with pytest.raises(IndexError, match=r"image index 42 outside 0\.\.41"):
        generate_image(config, config.total_images)


def test_two_sources_yield_identical_streams(images):
    again = list(SyntheticSource(URI).images())
    assert [(i.image_id, i.data, i.split) for i in again] == [(i.image_id, i.data, i.split) for i in images]


def test_worker_processes_give_the_same_world(monkeypatch):
    config = SyntheticConfig.from_uri("synthetic://shapes?seed=1&n=24&size=64")
    serial = list(generate_world(config, workers=1))
    monkeypatch.setattr(synthetic, "PARALLEL_FROM", 0)
    monkeypatch.setattr(synthetic, "CHUNK", 5)
    parallel = list(generate_world(config, workers=2))
    assert [png for _, png in parallel] == [png for _, png in serial]
    assert [r.tasks for r, _ in parallel] == [r.tasks for r, _ in serial]
    assert [r.tasks for r in generate_records(config, workers=2)] == [r.tasks for r, _ in serial]


# ---------------------------------------------------------------- images and ground truth


def test_source_images_follow_the_protocol(source, images):
    config = source.config
    assert len(images) == config.total_images == config.n + config.distractors
    assert [i.image_id for i in images] == [f"syn-{k:06d}" for k in range(config.total_images)]
    for image in images[:5]:
        assert image.origin == f"{URI}#{image.image_id}" and image.filename_hint == f"{image.image_id}.png"
        decoded = Image.open(io.BytesIO(image.data))
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (96, 96))


def test_splits_are_disjoint_blocks_with_configured_sizes(source, images):
    config = source.config
    by_split: dict[str, set[str]] = {}
    for image in images:
        by_split.setdefault(image.split, set()).add(image.image_id)
    assert set(by_split) == {"train", "val", "test"}
    assert sum(len(ids) for ids in by_split.values()) == len(images)  # disjoint
    counts = config.split_counts
    assert len(by_split["train"]) == counts["train"] == 32 and len(by_split["val"]) == counts["val"] == 4
    assert len(by_split["test"]) == counts["test"] + config.distractors == 4 + 2


def test_boxes_areas_and_masks_agree_and_stay_inside(instances):
    images = {i["id"]: i for i in instances["images"]}
    assert instances["annotations"], "no objects generated"
    for ann in instances["annotations"]:
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        mask = decode_rle(ann["segmentation"])
        assert int(mask.sum()) == ann["area"] > 0
        rows, cols = np.nonzero(mask)
        assert (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1) == (x, y, w, h)
        assert ann["iscrowd"] == 0 and SHAPES[ann["category_id"] - 1]
        colour, size = ann["attributes"]
        assert colour in COLOURS and size in ("small", "large")


def test_pixels_show_the_annotated_colours(source, images, instances):
    """The visible part of every object is painted in its annotated colour (robust median over the mask)."""
    by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    checked = 0
    for index, image in enumerate(images[:20]):
        pixels = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"), dtype=np.int16)
        for ann in by_image[index]:
            mask = decode_rle(ann["segmentation"])
            median = np.median(pixels[mask], axis=0)
            expected = np.array(COLOURS[ann["attributes"][0]])
            assert np.abs(median - expected).max() <= 20, (image.image_id, ann["attributes"], median)
            checked += 1
    assert checked >= 40


def test_occlusion_is_real_and_bounded(source, instances):
    anns = {a["id"]: a for a in instances["annotations"]}
    occluded = [a for a in anns.values() if a["occluded_by"]]
    assert occluded, "some objects should be partly hidden"
    for ann in occluded:
        for front in ann["occluded_by"]:
            assert anns[front]["image_id"] == ann["image_id"] and front > ann["id"]  # drawn later = in front
    scenes = [r.scene for r in source.records()]
    for scene in scenes:
        for obj in scene.objects:
            assert obj.area >= source.config.min_visible * obj.full_area


def test_near_duplicates_change_exactly_one_thing(source):
    config = source.config
    records = source.records()
    distractors = [r for r in records if r.scene.base_index is not None]
    assert len(distractors) == config.distractors == 2
    for record in distractors:
        base = records[record.scene.base_index].scene
        assert record.split == "test" and records[base.index].split == "test"
        assert record.scene.background == base.background and len(record.scene.objects) == len(base.objects)
        kind = record.scene.change.split(":")[0]
        looks = [(o.shape, o.colour, o.size) for o in base.objects]
        new_looks = [(o.shape, o.colour, o.size) for o in record.scene.objects]
        if kind == "swap":
            assert new_looks == looks
            moved = [
                k for k, (a, b) in enumerate(zip(base.objects, record.scene.objects, strict=True)) if a.bbox != b.bbox
            ]
            assert len(moved) >= 2
        else:
            assert sum(a != b for a, b in zip(looks, new_looks, strict=True)) == 1


def test_captions_follow_the_protocol(source):
    captions = list(source.captions())
    assert all(isinstance(c, SourceCaption) for c in captions)
    assert len({c.caption_id for c in captions}) == len(captions) == source.config.total_images
    ids = {f"syn-{k:06d}": source.config.split_of(k) for k in range(source.config.total_images)}
    assert all(ids[c.image_id] == c.split and c.caption.strip() for c in captions)


def test_native_files_are_the_contract_paths(source):
    files = source.native_files().files
    expected = {"annotations/instances.json", "annotations/captions.json", "tasks/flickr30k/dataset_flickr30k.json",
                "tasks/refcoco+/instances.json", "tasks/refcoco+/refs(unc).json"}  # fmt: skip
    for split in ("train", "val", "test"):
        expected |= {f"tasks/vqa/v2_OpenEnded_mscoco_{split}_questions.json",
                     f"tasks/vqa/v2_mscoco_{split}_annotations.json", f"tasks/vcr/{split}.jsonl"}  # fmt: skip
    assert {str(p) for p in files} == expected
    assert all(isinstance(v, bytes) and v for v in files.values())
    assert all(re.fullmatch(r"[a-z0-9_+/().\-]+", str(p), flags=re.I) for p in files)
