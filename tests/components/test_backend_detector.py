"""The ``detector`` backend's plumbing with RANDOM weights (shapes, limits, spec, hashing): never its accuracy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from components import storage
from components.features.backends import BackendError, BoxLimits, DetectorBackend, DetectorOptions, decode_rgb
from components.features.backends.base import PrepareContext, best_class_scores, select_regions
from components.features.backends.detector import BOX_HEAD_SIZE, load_state_dict_file
from components.sources.synthetic import SyntheticConfig, generate_image

NUM_CLASSES = 7  # background + 6: small, so the per-class NMS loop is quick
SMALL = DetectorOptions(min_size=96, max_size=128, proposals=40)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised fasterrcnn_resnet50_fpn saved as .pt and .safetensors (same tensors)."""
    from safetensors.torch import save_file
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    state = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).state_dict()
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "detector.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "detector.safetensors"))
    return {"pt": folder / "detector.pt", "safetensors": folder / "detector.safetensors"}


def images(n: int = 2) -> list[np.ndarray]:
    config = SyntheticConfig(n=10, size=96)
    return [decode_rgb(generate_image(config, i).png) for i in range(n)]


def prepare(weights: str, tmp_path: Path, options: DetectorOptions = SMALL):
    import pandas as pd

    ctx = PrepareContext("unused", pd.DataFrame(), str(tmp_path / "store"), tmp_path, BoxLimits(), log=lambda _m: None)
    return DetectorBackend(DetectorOptions(weights, options.min_size, options.max_size, options.proposals)).prepare(ctx)


def test_regions_have_the_contract_shapes_within_the_box_limits(random_weights, tmp_path):
    prepared = prepare(str(random_weights["pt"]), tmp_path)
    assert prepared.weights_sha256 == hashlib.sha256(random_weights["pt"].read_bytes()).hexdigest()
    assert (prepared.feature_size, prepared.num_classes) == (BOX_HEAD_SIZE, NUM_CLASSES)
    limits = BoxLimits(min_boxes=3, max_boxes=8, conf_threshold=0.5)
    extractor = DetectorBackend.load(prepared, limits, "cpu")
    batch = images(2)
    batch[1] = batch[1][:80, :60]  # another size in the same batch
    out = extractor.extract(batch)
    assert len(out) == 2
    for image, regions in zip(batch, out, strict=True):
        r = len(regions.boxes)
        assert 3 <= r <= 8
        assert regions.boxes.shape == (r, 4) and regions.features.shape == (r, BOX_HEAD_SIZE)
        assert regions.class_probs.shape == (r, NUM_CLASSES)
        np.testing.assert_allclose(regions.class_probs.sum(axis=1), 1.0, atol=1e-5)
        h, w = image.shape[:2]
        b = regions.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert np.isfinite(regions.features).all()


def test_safetensors_weights_give_the_same_regions_as_torch_save(random_weights, tmp_path):
    a = prepare(str(random_weights["pt"]), tmp_path)
    b = prepare(str(random_weights["safetensors"]), tmp_path)
    assert a.weights_sha256 != b.weights_sha256  # the hash is of the file the user gave
    batch = images(1)
    ra = DetectorBackend.load(a, BoxLimits(), "cpu").extract(batch)[0]
    rb = DetectorBackend.load(b, BoxLimits(), "cpu").extract(batch)[0]
    np.testing.assert_array_equal(ra.boxes, rb.boxes)
    np.testing.assert_allclose(ra.features, rb.features, atol=1e-5)


@pytest.mark.slow  # moves 160 MB of weights through the moto server
def test_weights_from_s3_are_fetched_and_hashed(random_weights, tmp_path, s3_bucket):
    uri = storage.join(s3_bucket, "weights", "detector.safetensors")
    storage.upload_file(random_weights["safetensors"], uri)
    prepared = prepare(uri, tmp_path)
    assert prepared.weights_uri == uri
    assert prepared.weights_sha256 == hashlib.sha256(random_weights["safetensors"].read_bytes()).hexdigest()


def test_bad_weights_are_refused_with_a_clear_error(random_weights, tmp_path):
    with pytest.raises(BackendError, match="needs weights"):
        prepare("", tmp_path)
    with pytest.raises(BackendError, match="not found"):
        prepare(str(tmp_path / "nope.pt"), tmp_path)
    state = load_state_dict_file(random_weights["pt"])
    del state["backbone.body.conv1.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(BackendError, match=r"missing \['backbone.body.conv1.weight'\]"):
        prepare(str(tmp_path / "partial.pt"), tmp_path)
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 4), "extra": object}, tmp_path / "code.pt")
    with pytest.raises(BackendError, match="cannot read weights"):  # weights_only refuses pickled code
        prepare(str(tmp_path / "code.pt"), tmp_path)


def test_region_selection_follows_bottom_up_attention():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3])
    keep = select_regions(scores, BoxLimits(min_boxes=1, max_boxes=10, conf_threshold=0.2))
    assert keep.tolist() == [0, 2, 4]  # over the threshold, best first
    keep = select_regions(scores, BoxLimits(min_boxes=4, max_boxes=10, conf_threshold=0.2))
    assert keep.tolist() == [0, 2, 4, 1]  # topped up with the next best
    keep = select_regions(scores, BoxLimits(min_boxes=1, max_boxes=2, conf_threshold=0.2))
    assert keep.tolist() == [0, 2]  # cut at max


def test_per_class_nms_keeps_each_regions_best_surviving_score():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])
    # class 1: box 0 wins and suppresses box 1; class 2: box 1 is alone above the floor there
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.6, 0.2, 0.2]])
    best = best_class_scores(boxes, probs, nms_threshold=0.3, floor=0.0)
    torch.testing.assert_close(best, torch.tensor([0.8, 0.3, 0.2]))
