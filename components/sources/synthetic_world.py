"""The synthetic world's scenes: sampling, near-duplicate variants, rendering to PNG, COCO ground truth.

A scene is a few coloured shapes (see :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`) on a textured
background.  Objects are drawn in list order, so later objects may partly hide earlier ones; placement
keeps every object at least ``min_visible`` visible and every overlap either absent or clearly visible,
so "A is in front of B" is a crisp fact of the ground truth.

Everything is a pure function of ``(seed, index)``: each image draws from its own numpy ``Generator``
(:func:`image_rng`, one stream per purpose), so any image can be regenerated alone and generation can be
split across processes.  Geometry is rasterised once for the masks (visible area, box) and again, with
the same Pillow calls, for the picture, so ground truth and pixels agree exactly.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
"""Object categories; COCO category id = position + 1."""
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "purple": (135, 55, 185),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
"""Named object colours (RGB before a small per-object jitter)."""
SIZES: tuple[str, ...] = ("small", "large")
#: Radius ranges as fractions of the image side; the gap between them keeps "small" / "large" unambiguous.
RADIUS = {"small": (0.07, 0.10), "large": (0.14, 0.19)}
BACKGROUNDS: tuple[str, ...] = ("stripes", "gradient", "noise", "checker")
#: An overlap must hide at least this fraction of the hidden object, or nothing (no barely-touching pairs).
MIN_OVERLAP = 0.08

# Independent random streams per image, so changing one product (say, the questions) never moves another.
STREAM_SCENE, STREAM_RENDER, STREAM_CAPTIONS, STREAM_VQA, STREAM_REFS, STREAM_FLICKR, STREAM_VCR = range(7)


def image_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one image and one purpose; a pure function of its arguments."""
    return np.random.default_rng([seed, index, stream])


def image_id_of(index: int) -> str:
    """The stable image id of image ``index``: ``syn-000123``."""
    return f"syn-{index:06d}"


def annotation_id(index: int, position: int) -> int:
    """COCO annotation id of object ``position`` (drawing order) in image ``index``; unique, order-free."""
    return index * 100 + position + 1


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.  Geometry is of the full shape; ``bbox``/``area`` are of its visible part."""

    shape: str
    """One of :data:`SHAPES`."""
    colour: str
    """One of :data:`COLOURS`."""
    size: str
    """``small`` or ``large``."""
    cx: float
    """Centre x of the full shape, pixels."""
    cy: float
    """Centre y of the full shape, pixels."""
    radius: float
    """Half the shape's extent, pixels."""
    angle: float
    """Rotation in degrees (0 for circles)."""
    fill: tuple[int, int, int] = (0, 0, 0)
    """The jittered RGB actually painted."""
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    """Visible part, COCO [x, y, w, h] (integers, tight around the visible pixels)."""
    area: int = 0
    """Visible pixels."""
    full_area: int = 0
    """Pixels of the whole shape, hidden or not."""
    occluded_by: tuple[int, ...] = ()
    """Positions of later objects that overlap (and so hide part of) this one."""
    rle: tuple[int, ...] = ()
    """Visible mask as COCO uncompressed RLE counts (column-major, starting with a run of zeros)."""

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the visible box: what relations ("left of", "above") are judged on."""
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


@dataclass(frozen=True)
class Scene:
    """One image's content, in drawing order (later objects are in front)."""

    index: int
    """Image index; the image id is ``syn-<index:06d>``."""
    size: int
    """Width = height, pixels."""
    background: str
    """One of :data:`BACKGROUNDS`."""
    objects: tuple[SceneObject, ...]
    """The shapes, back to front."""
    base_index: int | None = None
    """For a near-duplicate distractor: the index of the image it varies."""
    change: str | None = None
    """For a near-duplicate distractor: what was changed, e.g. ``colour: red circle -> blue circle``."""

    @property
    def image_id(self) -> str:
        return image_id_of(self.index)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circular shape (unit outline scaled by ``r``, rotated, moved)."""
    if shape == "square":
        unit = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "diamond":
        unit = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
    elif shape == "triangle":  # pointing up, moved down so its box is centred
        unit = [(math.cos(math.radians(a)), math.sin(math.radians(a)) + 0.25) for a in (-90, 30, 150)]
    elif shape == "star":
        unit = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
             (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k)) + 0.05)
            for k in range(10)
        ]  # fmt: skip
    elif shape == "cross":
        a, b = 0.33, 1.0
        unit = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]  # fmt: skip
    elif shape == "hexagon":
        unit = [(math.cos(math.radians(60 * k)), math.sin(math.radians(60 * k))) for k in range(6)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in unit]


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: int | tuple[int, int, int], outline=None) -> None:
    """Paint one object; masks and pictures go through this one function, so their footprints agree."""
    outline = fill if outline is None else outline
    if obj.shape == "circle":
        r = obj.radius * 0.9
        draw.ellipse([obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r], fill=fill, outline=outline)
    else:
        draw.polygon(_outline(obj.shape, obj.cx, obj.cy, obj.radius, obj.angle), fill=fill, outline=outline)


def _mask(obj: SceneObject, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(canvas), obj, 255)
    return np.asarray(canvas) > 0


def rle_counts(mask: np.ndarray) -> tuple[int, ...]:
    """COCO uncompressed RLE counts of a boolean mask (column-major runs, first run = zeros)."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return tuple([0, *counts] if flat[0] else counts)


def _layout_problem(masks: list[np.ndarray], min_visible: float) -> bool:
    """True if the masks (drawing order) break a rule: each object keeps ``min_visible`` of its pixels visible,
    and any pair overlaps by nothing or by at least :data:`MIN_OVERLAP` of the hidden (earlier) object."""
    for i, mask in enumerate(masks):
        full = int(np.count_nonzero(mask))
        if full == 0:
            return True
        covered = np.zeros_like(mask)
        for later in masks[i + 1 :]:
            overlap = mask & later
            count = int(np.count_nonzero(overlap))
            if count and count < MIN_OVERLAP * full:
                return True
            covered |= overlap
        if full - int(np.count_nonzero(covered)) < min_visible * full:
            return True
    return False


def finish_objects(
    objects: list[SceneObject], size: int, min_visible: float, masks: list[np.ndarray] | None = None
) -> tuple[SceneObject, ...] | None:
    """Fill in visibility, boxes and occlusion for objects in drawing order; None if the layout breaks a rule
    (see :func:`_layout_problem`).  ``masks``: the objects' full masks, already checked against the rules."""
    if masks is None:
        masks = [_mask(o, size) for o in objects]
        if _layout_problem(masks, min_visible):
            return None
    done: list[SceneObject] = []
    for i, obj in enumerate(objects):
        visible = masks[i].copy()
        occluders = [j for j in range(i + 1, len(objects)) if (masks[i] & masks[j]).any()]
        for j in occluders:
            visible &= ~masks[j]
        cols, rows = np.flatnonzero(visible.any(axis=0)), np.flatnonzero(visible.any(axis=1))
        bbox = (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0]) + 1, int(rows[-1] - rows[0]) + 1)
        done.append(
            replace(
                obj,
                bbox=bbox,
                area=int(np.count_nonzero(visible)),
                full_area=int(np.count_nonzero(masks[i])),
                occluded_by=tuple(occluders),
                rle=rle_counts(visible),
            )
        )
    return tuple(done)


def _sample_object(rng: np.random.Generator, size: int, earlier: list[SceneObject], twin_prob: float) -> SceneObject:
    if earlier and rng.random() < twin_prob:  # a same-looking twin: only a relation can tell them apart
        twin = earlier[int(rng.integers(len(earlier)))]
        shape, colour = twin.shape, twin.colour
    else:
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
    obj_size = SIZES[int(rng.integers(2))]
    lo, hi = RADIUS[obj_size]
    r = float(rng.uniform(lo, hi)) * size
    cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
    angle = 0.0 if shape == "circle" else float(rng.uniform(-12, 12))
    fill = tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in COLOURS[colour])
    return SceneObject(shape, colour, obj_size, cx, cy, r, angle, fill=fill)  # type: ignore[arg-type]


def _cover(
    masks: list[np.ndarray], covered: list[np.ndarray], new: np.ndarray, min_visible: float
) -> list[np.ndarray] | None:
    """Hidden pixels of the placed objects once ``new`` goes on top, or None if that breaks a layout rule
    (the same rules as :func:`_layout_problem`, checked incrementally: only pairs with ``new`` change)."""
    if not new.any():
        return None
    updated = []
    for mask, hidden in zip(masks, covered, strict=True):
        overlap = mask & new
        count = int(np.count_nonzero(overlap))
        full = int(np.count_nonzero(mask))
        if count and count < MIN_OVERLAP * full:
            return None
        hidden = hidden | overlap if count else hidden
        if full - int(np.count_nonzero(hidden)) < min_visible * full:
            return None
        updated.append(hidden)
    return updated


def sample_scene(
    seed: int, index: int, size: int, min_objects: int, max_objects: int, min_visible: float, twin_prob: float
) -> Scene:
    """A fresh random scene for image ``index`` (objects placed one by one, each retried until it fits)."""
    rng = image_rng(seed, index, STREAM_SCENE)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    for _ in range(50):
        count = int(rng.integers(min_objects, max_objects + 1))
        placed: list[SceneObject] = []
        masks: list[np.ndarray] = []
        covered: list[np.ndarray] = []  # per placed object: its pixels hidden by later ones
        for _ in range(count):
            for _ in range(60):
                candidate = _sample_object(rng, size, placed, twin_prob)
                mask = _mask(candidate, size)
                updated = _cover(masks, covered, mask, min_visible)
                if updated is not None:
                    placed.append(candidate)
                    masks.append(mask)
                    covered = [*updated, np.zeros_like(mask)]
                    break
            else:
                break  # this object does not fit: start the scene again
        if len(placed) == count:
            finished = finish_objects(placed, size, min_visible, masks)
            assert finished is not None  # _cover enforced the same rules
            return Scene(index, size, background, finished)
    raise RuntimeError(
        f"could not place {min_objects}-{max_objects} objects in a {size}px image for index {index}: "
        "lower max_objects or min_visible, or raise size"
    )


def near_duplicate(base: Scene, index: int, seed: int, min_visible: float) -> Scene:
    """A distractor for retrieval: ``base`` with one attribute or one relation changed (same background).

    Tries, in random order, a new colour, a new shape, the other size, or swapping the places of two
    different-looking objects; a colour change always fits, so this never fails."""
    rng = image_rng(seed, index, STREAM_SCENE)
    objects = list(base.objects)
    kinds = [str(k) for k in rng.permutation(["colour", "shape", "size", "swap"])]
    for kind in kinds:
        for _ in range(10):
            i = int(rng.integers(len(objects)))
            obj = objects[i]
            changed = list(objects)
            if kind == "colour":
                new = str(rng.choice([c for c in COLOURS if c != obj.colour]))
                fill = tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in COLOURS[new])
                changed[i] = replace(obj, colour=new, fill=fill)  # type: ignore[arg-type]
                note = f"colour: {obj.colour} {obj.shape} -> {new} {obj.shape}"
            elif kind == "shape":
                new = str(rng.choice([s for s in SHAPES if s != obj.shape]))
                changed[i] = replace(obj, shape=new, angle=0.0 if new == "circle" else float(rng.uniform(-12, 12)))
                note = f"shape: {obj.colour} {obj.shape} -> {obj.colour} {new}"
            elif kind == "size":
                new = "large" if obj.size == "small" else "small"
                r = float(rng.uniform(*RADIUS[new])) * base.size
                cx, cy = (float(np.clip(v, r + 1, base.size - r - 1)) for v in (obj.cx, obj.cy))
                changed[i] = replace(obj, size=new, radius=r, cx=cx, cy=cy)
                note = f"size: {obj.size} {obj.colour} {obj.shape} -> {new}"
            else:
                others = [j for j, o in enumerate(objects) if (o.shape, o.colour) != (obj.shape, obj.colour)]
                if not others:
                    break
                j = others[int(rng.integers(len(others)))]
                a, b = objects[i], objects[j]
                changed[i] = replace(a, cx=float(np.clip(b.cx, a.radius + 1, base.size - a.radius - 1)),
                                     cy=float(np.clip(b.cy, a.radius + 1, base.size - a.radius - 1)))  # fmt: skip
                changed[j] = replace(b, cx=float(np.clip(a.cx, b.radius + 1, base.size - b.radius - 1)),
                                     cy=float(np.clip(a.cy, b.radius + 1, base.size - b.radius - 1)))  # fmt: skip
                note = f"swap: {a.colour} {a.shape} <-> {b.colour} {b.shape}"
            finished = finish_objects(changed, base.size, min_visible)
            if finished is not None:
                return Scene(index, base.size, base.background, finished, base_index=base.index, change=note)
    raise AssertionError("unreachable: a colour change always keeps the layout valid")


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A mid-tone, low-saturation colour, so every named object colour stands out against it."""
    return rng.uniform(85, 175) + rng.uniform(-25, 25, 3)


def render_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float array: stripes, a linear gradient, smooth blotchy noise, or a checkerboard."""
    c1, c2 = _muted(rng), _muted(rng)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    if kind == "stripes":
        period = rng.uniform(6, 16) * size / 96
        t = ((x * math.cos(theta) + y * math.sin(theta)) / period) % 1.0 < 0.5
        return np.where(t[..., None], c1, c2)
    if kind == "gradient":
        t = x * math.cos(theta) + y * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return c1 * (1 - t[..., None]) + c2 * t[..., None]
    if kind == "noise":
        cells = int(rng.integers(3, 8))
        low = np.clip(rng.normal(0, 22, (cells, cells, 3)) + (c1 + c2) / 2, 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    if kind == "checker":
        cell = rng.uniform(8, 20) * size / 96
        t = ((x // cell + y // cell) % 2) == 0
        return np.where(t[..., None], c1, c2)
    raise ValueError(f"unknown background {kind!r}")


def render_png(scene: Scene, seed: int) -> bytes:
    """The scene as PNG bytes: background, shapes back to front (some outlined), then mild sensor noise."""
    # A near-duplicate reuses its original's stream: same background, outlines and noise, so only the change shows.
    rng = image_rng(seed, scene.index if scene.base_index is None else scene.base_index, STREAM_RENDER)
    canvas = Image.fromarray(np.clip(render_background(scene.background, scene.size, rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        outline = tuple(int(c * 0.6) for c in obj.fill) if rng.random() < 0.3 else None
        _draw(draw, obj, obj.fill, outline)
    pixels = np.asarray(canvas, dtype=np.int16) + rng.integers(-6, 7, (scene.size, scene.size, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def coco_image(scene: Scene) -> dict:
    """The COCO ``images`` entry (integer id = image index; file name = ``<image_id>.png``)."""
    return {"id": scene.index, "file_name": f"{scene.image_id}.png", "width": scene.size, "height": scene.size}


def coco_annotations(scene: Scene) -> list[dict]:
    """COCO instance annotations for a scene, with ``attributes`` [colour, size] and ``occluded_by`` ids."""
    return [
        {
            "id": annotation_id(scene.index, k),
            "image_id": scene.index,
            "category_id": SHAPES.index(o.shape) + 1,
            "bbox": list(o.bbox),
            "area": o.area,
            "iscrowd": 0,
            "segmentation": {"size": [scene.size, scene.size], "counts": list(o.rle)},
            "attributes": [o.colour, o.size],
            "occluded_by": [annotation_id(scene.index, j) for j in o.occluded_by],
        }
        for k, o in enumerate(scene.objects)
    ]


def coco_categories() -> list[dict]:
    """COCO categories: one per shape."""
    return [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
