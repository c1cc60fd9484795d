"""The ``demo`` backend: image decoding, colour-segmentation proposals, and a detector trained on the world."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.features.backends import BackendError, BoxLimits, DemoBackend, DemoOptions, decode_rgb
from components.features.backends.base import PrepareContext, box_recall
from components.features.backends.demo import STORE_SUBDIR, WEIGHTS_FILE, DemoArchitecture, DemoDetector
from components.features.backends.demo_proposals import ProposalOptions, grid_windows, propose
from components.features.backends.demo_training import build_vocabulary, evaluate, load_annotated
from components.sources.synthetic import SyntheticConfig, generate_image
from components.sources.synthetic_world import COLOURS, SHAPES, coco_categories
from components.steps.ingest import IngestConfig, run_ingest


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_every_image_mode_decodes_to_rgb_uint8():
    rgba = Image.new("RGBA", (5, 4), (10, 20, 30, 0))
    palette = Image.new("P", (5, 4), 0)
    palette.info["transparency"] = 0
    cases = {
        "L": Image.new("L", (5, 4), 77),
        "LA": Image.new("LA", (5, 4), (77, 255)),
        "1": Image.new("1", (5, 4), 1),
        "P+transparency": palette,
        "RGBA": rgba,
        "I;16": Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)),
    }
    decoded = {name: decode_rgb(encode(image)) for name, image in cases.items()}
    decoded["CMYK"] = decode_rgb(encode(Image.new("CMYK", (5, 4), (0, 255, 255, 0)), "JPEG"))
    for name, rgb in decoded.items():
        assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8, name
    assert (decoded["L"] == 77).all() and (decoded["I;16"] == 255).all()
    assert (decoded["RGBA"] == 255).all()  # fully transparent: composited over white
    assert decoded["CMYK"][0, 0, 0] > 200 and decoded["CMYK"][0, 0, 1:].max() < 60  # red
    png = encode(Image.new("RGB", (64, 64), (1, 2, 3)))
    for bad in (b"", b"not an image", png[: len(png) // 2]):
        with pytest.raises(Exception):  # noqa: B017 - Pillow raises several types; the caller quarantines any
            decode_rgb(bad)


def test_proposals_cover_most_objects_of_the_world():
    config = SyntheticConfig(n=40, size=96)
    preds, truth = [], []
    for i in range(40):
        image = generate_image(config, i)
        preds.append(propose(decode_rgb(image.png), ProposalOptions()))
        truth.append(np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in image.annotations)]))
    recall = box_recall(preds, truth)
    assert recall > 0.85, recall  # measured 0.95 on 200 images
    assert max(len(p) for p in preds) <= ProposalOptions().max_proposals + 14
    blank = propose(np.full((40, 50, 3), 128, np.uint8), ProposalOptions())
    np.testing.assert_array_equal(blank, grid_windows(50, 40))  # nothing to segment: the anchors remain


def test_vocabulary_is_background_then_colour_shape_pairs_padded_to_c():
    annotations = [{"category_id": SHAPES.index(s) + 1, "attributes": [c, "small"]} for s in SHAPES for c in COLOURS]
    instances = {"categories": coco_categories(), "annotations": annotations}
    classes, attributes = build_vocabulary(instances, 64)
    assert len(classes) == 64 and classes[0] == "background"
    assert classes[1] == "black circle" and "yellow hexagon" in classes
    assert sum(not c.startswith("unused-") for c in classes) == 1 + len(SHAPES) * len(COLOURS)
    assert set(attributes) == {*COLOURS, "small"}
    with pytest.raises(BackendError, match="do not fit num_classes=32"):
        build_vocabulary(instances, 32)


def ingest_world(root: Path, n: int, size: int = 96) -> str:
    run_ingest(IngestConfig(source=f"synthetic://shapes?seed=0&n={n}&size={size}", output=str(root), progress=False))
    return str(root)


def context(dataset: str, store: Path, work: Path) -> PrepareContext:
    manifest = pd.read_parquet(Path(dataset) / "manifest.parquet")
    return PrepareContext(dataset, manifest, str(store), work, BoxLimits(), log=lambda _m: None)


def test_an_untrained_detector_detects_nothing(tmp_path):
    """The metric the trained detector is held to is not met by chance: random weights score ~0."""
    dataset = ingest_world(tmp_path / "ds", 12)
    ctx = context(dataset, tmp_path / "store", tmp_path)
    instances = json.loads((Path(dataset) / "annotations" / "instances.json").read_text())
    classes, attributes = build_vocabulary(instances, 64)
    detector = DemoDetector(DemoArchitecture(classes, attributes))
    held, unusable = load_annotated(ctx, ctx.manifest, instances, detector)
    assert unusable == 0 and len(held) == len(ctx.manifest)
    report = evaluate(detector, held, BoxLimits())
    assert report["detection_recall_at_0_5"] < 0.2


@pytest.mark.slow
def test_demo_detector_trains_on_the_world_and_finds_held_out_objects(tmp_path):
    dataset = ingest_world(tmp_path / "ds", 200)
    store = tmp_path / "store"
    options = DemoOptions(train_images=160, epochs=10, batch_images=8, eval_images=40)
    prepared = DemoBackend(options).prepare(context(dataset, store, tmp_path / "work"))
    report = prepared.report
    # Loose floors a broken detector fails (untrained: detection recall ~0, class accuracy ~1/56);
    # measured with these options (seed 0): detection recall 0.95, class accuracy 0.78.
    assert report["held_out_images"] == 20  # the val split
    assert report["detection_recall_at_0_5"] > 0.5, report
    assert report["gt_box_class_accuracy"] > 0.3, report
    assert report["loss_last_epoch"] < 0.5 * report["loss_first_epoch"]
    assert (prepared.feature_size, prepared.num_classes) == (256, 64)

    saved = store / STORE_SUBDIR
    assert prepared.weights_uri == str(saved) and (saved / "config.json").exists()
    again = DemoBackend(options).prepare(context(dataset, store, tmp_path / "work2"))  # reuses, never retrains
    assert again.weights_sha256 == prepared.weights_sha256 and again.report == report

    limits = BoxLimits(min_boxes=2, max_boxes=12)
    image = decode_rgb(generate_image(SyntheticConfig(n=200, size=96), 190).png)
    regions = DemoBackend.load(prepared, limits, "cpu").extract([image, image[:70]])
    reloaded = DemoDetector.load(saved).detect([image], limits)[0].regions
    np.testing.assert_allclose(regions[0].features, reloaded.features, atol=1e-5)
    for r in regions:
        assert 2 <= len(r.boxes) <= 12 and r.features.shape == (len(r.boxes), 256)
        np.testing.assert_allclose(r.class_probs.sum(axis=1), 1.0, atol=1e-5)

    (saved / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes()[:-8] + b"tampered")
    with pytest.raises(BackendError, match="changed since the run started"):
        DemoBackend.load(prepared, limits, "cpu")
