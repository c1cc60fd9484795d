"""The evaluate step's pictures: valid, non-empty PNGs of the documented size, drawn from PIL images or image
bytes, written atomically; bad input refused."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.metrics import pictures
from components.metrics.pictures import (
    DPI,
    GroundingExample,
    RetrievalExample,
    answer_distribution_png,
    attention_matrix_png,
    grounding_examples_png,
    region_attention_png,
    retrieval_examples_png,
    training_curves_png,
)


def scene(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste(colour, (20, 10, 60, 50))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_png(path: Path, inches: tuple[float, float]) -> np.ndarray:
    """The file is a decodable PNG of ``inches`` x DPI pixels that is not blank; returns its RGB pixels."""
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(inches[0] * DPI), round(inches[1] * DPI))
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    return pixels


def has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 30) -> bool:
    return bool((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= tolerance).any())


def test_retrieval_examples(tmp_path: Path) -> None:
    red, blue = scene((220, 30, 30)), png_bytes(scene((30, 30, 220)))
    examples = [
        RetrievalExample(
            "a red square", [red, blue, red, blue, red], correct_index=0, scores=[3.2, 1.0, 0.5, 0.1, 0.0]
        ),
        RetrievalExample("a blue square far too long to fit on one line " * 3, [red, red, blue], correct_index=None),
    ]
    path = retrieval_examples_png(tmp_path / "out", examples, name="retrieval.png")
    assert path == tmp_path / "out" / "retrieval.png"
    pixels = check_png(path, (5 * 2.0, 2 * 2.5))
    assert has_colour(pixels, (0x1A, 0x98, 0x50), tolerance=10)  # the green frame of the correct image


def test_grounding_examples(tmp_path: Path) -> None:
    examples = [
        GroundingExample(scene((200, 200, 30)), "the yellow square", [18, 8, 62, 52], [20, 10, 60, 50]),
        GroundingExample(png_bytes(scene((30, 200, 200))), "the left corner", [0, 0, 10, 10], [20, 10, 60, 50]),
    ]
    pixels = check_png(grounding_examples_png(tmp_path, examples, columns=3), (2 * 3.0, 1 * 3.5))
    assert has_colour(pixels, (0xD7, 0x30, 0x27), tolerance=10)  # predicted boxes in red
    four = grounding_examples_png(tmp_path, examples * 2, columns=3, name="four.png")
    check_png(four, (3 * 3.0, 2 * 3.5))


def test_region_attention(tmp_path: Path) -> None:
    boxes = np.array([[0, 0, 48, 32], [40, 20, 96, 64], [10, 10, 30, 30]], dtype=np.float32)
    path = region_attention_png(tmp_path, png_bytes(scene((30, 120, 30))), boxes, [0.2, 0.7, 0.1], word="square")
    check_png(path, (5.0, 4.5))


def test_attention_matrix(tmp_path: Path) -> None:
    matrix = np.random.default_rng(0).random((5, 12))
    path = attention_matrix_png(tmp_path, matrix, ["[CLS]", "red", "square", ".", "[SEP]"])
    check_png(path, (8.0, 6.0))
    many = attention_matrix_png(tmp_path, np.ones((60, 101)), [f"w{i}" for i in range(60)], name="many.png")
    check_png(many, (8.0, 6.0))


def test_answer_distribution(tmp_path: Path) -> None:
    predicted = ["yes"] * 6 + ["no"] * 3 + ["2"]
    truth = ["yes"] * 4 + ["no"] * 4 + ["3", "red"]
    path = answer_distribution_png(tmp_path, predicted, truth, top_k=3)
    check_png(path, (8.0, 6.0))


def test_training_curves(tmp_path: Path) -> None:
    series = {"train loss": ([0, 10, 20, 30], [2.0, 1.4, 1.1, 0.9]), "val loss": (np.array([0, 30]), [2.1, 1.2])}
    check_png(training_curves_png(tmp_path, series), (7.0, 4.5))
    check_png(training_curves_png(tmp_path, series, log_y=True, name="log.png"), (7.0, 4.5))


def test_bad_input_is_refused(tmp_path: Path) -> None:
    image = scene((1, 2, 3))
    with pytest.raises(ValueError, match="cannot be decoded"):
        region_attention_png(tmp_path, b"not an image", [[0, 0, 1, 1]], [1.0], word="x")
    with pytest.raises(TypeError, match="PIL image"):
        region_attention_png(tmp_path, "path.png", [[0, 0, 1, 1]], [1.0], word="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        region_attention_png(tmp_path, image, [[0, 0, 1, 1]], [0.5, 0.5], word="x")
    with pytest.raises(ValueError, match="non-negative"):
        region_attention_png(tmp_path, image, [[0, 0, 1, 1]], [-0.5], word="x")
    with pytest.raises(ValueError, match="plain file name"):
        training_curves_png(tmp_path, {"a": ([0], [1.0])}, name="../escape.png")
    with pytest.raises(ValueError, match="positive"):
        training_curves_png(tmp_path, {"a": ([0, 1], [1.0, 0.0])}, log_y=True)
    with pytest.raises(ValueError, match="equal length"):
        training_curves_png(tmp_path, {"a": ([0, 1], [1.0])})
    with pytest.raises(ValueError, match="correct_index"):
        retrieval_examples_png(tmp_path, [RetrievalExample("c", [image], correct_index=1)])
    with pytest.raises(ValueError, match="1 to 12"):
        grounding_examples_png(tmp_path, [])
    with pytest.raises(ValueError, match="x2 < x1"):
        grounding_examples_png(tmp_path, [GroundingExample(image, "e", [5, 5, 1, 1], [0, 0, 1, 1])])
    with pytest.raises(ValueError, match="non-empty"):
        answer_distribution_png(tmp_path, [], ["yes"])
    assert not list(tmp_path.iterdir())  # nothing written by a refused call


def test_importing_the_pictures_module_has_no_side_effects() -> None:
    code = "import sys, components.metrics.pictures; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert pictures.DPI == DPI
