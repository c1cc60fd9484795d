"""PNG pictures for the evaluate step: retrieval examples, grounding boxes, co-attention, answer distributions,
training curves.

Every function draws one figure with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch, safe in threads and without a display), writes ``<out_dir>/<name>`` atomically (temporary file +
rename, so a crash never leaves half a PNG) and returns its path.  Sizes are fixed so pictures stay small
and legible: the pixel size is the documented figure size in inches times ``DPI``.  Images are PIL images or
encoded image bytes; boxes are pixel x1, y1, x2, y2 (the feature store's convention).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from components.metrics._arrays import as_array
from components.metrics.grounding import box_iou

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

#: Resolution of every picture: pixel size = figure size in inches x DPI.
DPI = 100
#: An image given as a PIL image or as its encoded bytes (PNG, JPEG, ...).
ImageLike = Union["Image.Image", bytes, bytearray]
#: Colours: ground truth green, prediction red (the usual reading of such pictures).
TRUE_COLOUR, PRED_COLOUR = "#1a9850", "#d73027"


@dataclass(frozen=True)
class RetrievalExample:
    """One caption query and the images the model ranked highest for it."""

    caption: str  # the query text
    ranked_images: Sequence[ImageLike]  # the top-k retrieved images, best first
    correct_index: int | None  # position of the correct image in ranked_images; None when it is not among them
    scores: Sequence[float] | None = None  # the model's score for each ranked image (printed under it), optional


@dataclass(frozen=True)
class GroundingExample:
    """One referring expression with the box the model chose and the true box."""

    image: ImageLike  # the image the expression refers to
    expression: str  # the referring expression, shown as the panel title
    pred_box: Sequence[float]  # predicted box, pixel x1, y1, x2, y2
    true_box: Sequence[float]  # ground-truth box, pixel x1, y1, x2, y2


def _rgb(image: ImageLike) -> np.ndarray:
    """An image as uint8 [H, W, 3]."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(bytes(image)))
            image.load()
        except Exception as exc:  # PIL raises many types for bad bytes; one clear error for all of them
            raise ValueError(f"image bytes cannot be decoded: {exc}") from exc
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or image bytes, got {type(image).__name__}")
    return np.asarray(image.convert("RGB"))


def _figure(width_in: float, height_in: float) -> Figure:
    """A figure on its own Agg canvas (chosen here, per figure: nothing global changes).

    Constrained layout packs the axes and their labels into the fixed figure size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out_dir: str | Path, name: str) -> Path:
    """Write ``figure`` as ``out_dir/name`` (PNG, atomically) and return the path."""
    from components.storage import atomic_write_local

    if Path(name).name != name or not name.endswith(".png"):
        raise ValueError(f"name must be a plain file name ending in .png, got {name!r}")
    path = Path(out_dir) / name
    atomic_write_local(path, lambda fh: figure.savefig(fh, format="png", dpi=DPI))
    return path


def _show(ax: Axes, pixels: np.ndarray) -> None:
    """Draw an image with pixel edges at integer coordinates, so xyxy boxes land where they belong."""
    height, width = pixels.shape[:2]
    ax.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _box(ax: Axes, box: np.ndarray, colour: str, style: str = "-", width: float = 2.0) -> None:
    """Outline ``box`` (pixel xyxy), with a white halo so it shows on any background."""
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke

    x1, y1, x2, y2 = (float(v) for v in box)
    rectangle = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linestyle=style, linewidth=width)
    rectangle.set_path_effects([withStroke(linewidth=width + 2, foreground="white")])
    ax.add_patch(rectangle)


def retrieval_examples_png(
    out_dir: str | Path, examples: Sequence[RetrievalExample], *, name: str = "retrieval_examples.png"
) -> Path:
    """One row per caption (wrapped caption above, its top-k images left to right, the correct one framed green).

    Size: (k x 2.0 in) x (rows x 2.5 in) at ``DPI``, k = the longest ranked list; at most 8 rows, at most 10
    images per row (pass fewer for a smaller picture).
    """
    if not examples or len(examples) > 8:
        raise ValueError(f"retrieval_examples_png: 1 to 8 examples, got {len(examples)}")
    columns = max(len(e.ranked_images) for e in examples)
    if columns == 0 or columns > 10:
        raise ValueError(f"retrieval_examples_png: 1 to 10 ranked images per example, got {columns}")
    figure = _figure(columns * 2.0, len(examples) * 2.5)
    rows = figure.subfigures(len(examples), 1, squeeze=False)[:, 0]
    for row, example in zip(rows, examples, strict=True):
        correct = example.correct_index
        if correct is not None and not 0 <= correct < len(example.ranked_images):
            raise ValueError(f"correct_index {correct} outside the {len(example.ranked_images)} ranked images")
        if example.scores is not None and len(example.scores) != len(example.ranked_images):
            raise ValueError("scores: one score per ranked image expected")
        missed = "" if correct is not None else f"  [correct image not in top {len(example.ranked_images)}]"
        row.suptitle(textwrap.fill(f"“{example.caption}”{missed}", width=24 * columns), fontsize=9)
        axes = row.subplots(1, columns, squeeze=False)[0]
        for position, ax in enumerate(axes):
            if position >= len(example.ranked_images):
                ax.axis("off")
                continue
            _show(ax, _rgb(example.ranked_images[position]))
            label = f"#{position + 1}"
            if example.scores is not None:
                label += f"  {float(example.scores[position]):.3g}"
            if position == correct:
                label += "  correct"
                for spine in ax.spines.values():
                    spine.set_edgecolor(TRUE_COLOUR)
                    spine.set_linewidth(4)
            ax.set_xlabel(label, fontsize=8, color=TRUE_COLOUR if position == correct else "black")
    return _save(figure, out_dir, name)


def grounding_examples_png(
    out_dir: str | Path,
    examples: Sequence[GroundingExample],
    *,
    columns: int = 3,
    name: str = "grounding_examples.png",
) -> Path:
    """A grid of images, each with its true box (solid green) and predicted box (dashed red), the expression
    and the IoU as the title.

    Size: (min(n, columns) x 3.0 in) x (ceil(n / columns) x 3.5 in) at ``DPI``; at most 12 examples.
    """
    if not examples or len(examples) > 12:
        raise ValueError(f"grounding_examples_png: 1 to 12 examples, got {len(examples)}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cols = min(columns, len(examples))
    rows = math.ceil(len(examples) / cols)
    figure = _figure(cols * 3.0, rows * 3.5)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(examples) :]:
        ax.axis("off")
    for ax, example in zip(axes, examples, strict=False):
        pred = as_array(example.pred_box, name="pred_box")
        true = as_array(example.true_box, name="true_box")
        iou = float(box_iou(pred, true)[0])
        _show(ax, _rgb(example.image))
        _box(ax, true, TRUE_COLOUR)
        _box(ax, pred, PRED_COLOUR, style="--")
        verdict = "hit" if iou >= 0.5 else "miss"
        ax.set_title(textwrap.fill(example.expression, 34) + f"\nIoU {iou:.2f} ({verdict})", fontsize=8)
    figure.legend(handles=_legend_handles(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return _save(figure, out_dir, name)


def _legend_handles() -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color=TRUE_COLOUR, linewidth=2, label="ground truth"),
        Line2D([], [], color=PRED_COLOUR, linewidth=2, linestyle="--", label="prediction"),
    ]


def region_attention_png(
    out_dir: str | Path,
    image: ImageLike,
    boxes: Any,
    weights: Any,
    *,
    word: str,
    name: str = "region_attention.png",
) -> Path:
    """The image with each region shaded by the attention weight it gets from ``word`` (a pixel shows the largest
    weight of the regions covering it); the three strongest regions are outlined and labelled.

    ``boxes``: [R, 4] pixel xyxy; ``weights``: [R] non-negative (e.g. one row of a co-attention map).
    Size: 5.0 x 4.5 in at ``DPI``.
    """
    pixels = _rgb(image)
    box_array = as_array(boxes, name="boxes", ndim=2)
    weight_array = as_array(weights, name="weights", ndim=1)
    if box_array.shape != (weight_array.size, 4) or weight_array.size == 0:
        raise ValueError(
            f"boxes [R, 4] and weights [R] expected (R >= 1), got {box_array.shape} and {weight_array.shape}"
        )
    if weight_array.min() < 0:
        raise ValueError("weights must be non-negative")
    height, width = pixels.shape[:2]
    heat = np.zeros((height, width))
    for (x1, y1, x2, y2), weight in zip(box_array, weight_array, strict=True):
        rows = slice(max(0, math.floor(y1)), min(height, math.ceil(y2)))
        cols = slice(max(0, math.floor(x1)), min(width, math.ceil(x2)))
        heat[rows, cols] = np.maximum(heat[rows, cols], weight)
    figure = _figure(5.0, 4.5)
    ax = figure.subplots()
    _show(ax, pixels)
    top = float(weight_array.max()) or 1.0
    shading = ax.imshow(
        heat, extent=(0, width, height, 0), cmap="inferno", alpha=0.6, vmin=0.0, vmax=top, interpolation="nearest"
    )
    for rank, index in enumerate(np.argsort(-weight_array, kind="stable")[:3]):
        _box(ax, box_array[index], "cyan", width=2.5 - 0.5 * rank)
        ax.text(
            box_array[index, 0],
            box_array[index, 1],
            f"{weight_array[index]:.2f}",
            color="cyan",
            fontsize=8,
            va="bottom",
        )
    figure.colorbar(shading, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    ax.set_title(textwrap.fill(f"attention from “{word}”", 50), fontsize=10)
    return _save(figure, out_dir, name)


def attention_matrix_png(
    out_dir: str | Path,
    matrix: Any,
    words: Sequence[str],
    *,
    region_labels: Sequence[str] | None = None,
    title: str = "co-attention: words x regions",
    name: str = "attention_matrix.png",
) -> Path:
    """A words x regions heat map (rows: ``words``, columns: regions, labelled ``region_labels`` or 0..R-1).

    ``matrix``: [W, R] attention weights (e.g. averaged over heads).  Size: 8.0 x 6.0 in at ``DPI``.
    """
    weights = as_array(matrix, name="matrix", ndim=2)
    if weights.shape[0] != len(words) or 0 in weights.shape:
        raise ValueError(f"matrix must be [len(words), R] with R >= 1, got {weights.shape} for {len(words)} words")
    labels = list(region_labels) if region_labels is not None else [str(i) for i in range(weights.shape[1])]
    if len(labels) != weights.shape[1]:
        raise ValueError(f"region_labels: {weights.shape[1]} labels expected, got {len(labels)}")
    figure = _figure(8.0, 6.0)
    ax = figure.subplots()
    shading = ax.imshow(weights, cmap="viridis", aspect="auto", interpolation="nearest")
    # Thin out tick labels on long axes so they stay legible.
    row_step, col_step = max(1, math.ceil(len(words) / 40)), max(1, math.ceil(len(labels) / 40))
    ax.set_yticks(range(0, len(words), row_step), [words[i] for i in range(0, len(words), row_step)], fontsize=8)
    ax.set_xticks(range(0, len(labels), col_step), [labels[i] for i in range(0, len(labels), col_step)], fontsize=8)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel("region")
    ax.set_ylabel("word")
    ax.set_title(title, fontsize=10)
    figure.colorbar(shading, ax=ax, label="attention weight")
    return _save(figure, out_dir, name)


def answer_distribution_png(
    out_dir: str | Path,
    predicted: Sequence[str],
    ground_truth: Sequence[str],
    *,
    top_k: int = 15,
    title: str = "answers: predicted vs ground truth",
    name: str = "answer_distribution.png",
) -> Path:
    """Horizontal bars: share of each answer among the predictions and among the ground-truth answers, for the
    ``top_k`` answers most frequent in both together (most frequent on top).  Size: 8.0 x 6.0 in at ``DPI``.
    """
    if not predicted or not ground_truth:
        raise ValueError("answer_distribution_png: predicted and ground_truth must both be non-empty")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    pred_counts, true_counts = Counter(predicted), Counter(ground_truth)
    combined = Counter(
        {a: pred_counts[a] / len(predicted) + true_counts[a] / len(ground_truth) for a in {*pred_counts, *true_counts}}
    )
    answers = [a for a, _ in sorted(combined.items(), key=lambda item: (-item[1], item[0]))[:top_k]]
    positions = np.arange(len(answers))[::-1]  # most frequent on top
    figure = _figure(8.0, 6.0)
    ax = figure.subplots()
    bar = 0.4
    ax.barh(
        positions + bar / 2,
        [true_counts[a] / len(ground_truth) for a in answers],
        bar,
        color=TRUE_COLOUR,
        label="ground truth",
    )
    ax.barh(
        positions - bar / 2,
        [pred_counts[a] / len(predicted) for a in answers],
        bar,
        color=PRED_COLOUR,
        label="predicted",
    )
    ax.set_yticks(positions, [textwrap.shorten(a, 30) for a in answers], fontsize=8)
    ax.set_xlabel("share of questions")
    ax.set_title(f"{title} (top {len(answers)})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(figure, out_dir, name)


def training_curves_png(
    out_dir: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "training",
    xlabel: str = "step",
    ylabel: str = "loss",
    log_y: bool = False,
    name: str = "training_curves.png",
) -> Path:
    """One line per series, ``{label: (steps, values)}`` (e.g. ``{"train loss": ..., "val loss": ...}``).

    ``log_y`` draws the values on a log axis (they must then be positive).  Size: 7.0 x 4.5 in at ``DPI``.
    """
    if not series:
        raise ValueError("training_curves_png: no series")
    figure = _figure(7.0, 4.5)
    ax = figure.subplots()
    for label, (steps, values) in series.items():
        x = as_array(steps, name=f"{label} steps", ndim=1)
        y = as_array(values, name=f"{label} values", ndim=1)
        if x.size == 0 or x.shape != y.shape:
            raise ValueError(f"series {label!r}: steps and values must be non-empty and of equal length")
        if log_y and y.min() <= 0:
            raise ValueError(f"series {label!r}: log_y needs positive values")
        ax.plot(x, y, label=label, linewidth=1.5, marker="o" if x.size < 20 else None, markersize=3)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, out_dir, name)
