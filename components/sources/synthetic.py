"""The embedded synthetic world, the default data source: ``synthetic://shapes?seed=0&n=3000&size=96``.

Images of coloured shapes on textured backgrounds, their COCO ground truth, weakly aligned pretraining
captions (a configurable share partly wrong), and the four downstream datasets (VQA v2, RefCOCO+,
Flickr30k retrieval with near-duplicate distractors, VCR-style Q->A), each in the real dataset's format.

Image ``i`` is a pure function of ``(config, i)`` (:func:`generate_image`), so images are reproducible one
by one and generation runs in parallel over index ranges.  Indices ``0 .. n-1`` are the base images
(train, then val, then test, in contiguous blocks, so the splits are disjoint by image); the near-duplicate
distractors follow as ``n ..`` and belong to the test split.

    source = SyntheticSource("synthetic://shapes?seed=0&n=300&size=96")
    for image in source.images(): ...          # SourceImage: syn-000123, PNG bytes, split
    files = source.native_files().files        # annotations/instances.json, tasks/vqa/..., ...
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from components.sources.base import SourceCaption, SourceFiles, SourceImage
from components.sources.synthetic_formats import WorldRecord, native_files
from components.sources.synthetic_tasks import image_tasks
from components.sources.synthetic_world import (
    Scene,
    coco_annotations,
    coco_image,
    image_id_of,
    near_duplicate,
    render_png,
    sample_scene,
)

SCHEME = "synthetic"
WORLDS = ("shapes",)
#: Below this many images, generation stays in-process (starting workers would cost more than it saves).
PARALLEL_FROM = 256
CHUNK = 64

T = TypeVar("T")


class SyntheticConfigError(ValueError):
    """A ``synthetic://`` URI or a config value that cannot be used; the message names the parameter."""


@dataclass(frozen=True)
class SyntheticConfig:
    """What the synthetic world contains; every field is also a URI query parameter of the same name."""

    seed: int = 0
    """Seed of the whole world; image i draws only from streams seeded by (seed, i)."""
    n: int = 3000
    """Base images (train + val + test); near-duplicate distractors are added on top (see distractor_fraction)."""
    size: int = 96
    """Image width and height in pixels (32-1024)."""
    min_objects: int = 2
    """Fewest shapes in an image (1-10)."""
    max_objects: int = 6
    """Most shapes in an image (min_objects-10)."""
    val_fraction: float = 0.1
    """Share of the base images in the val split."""
    test_fraction: float = 0.1
    """Share of the base images in the test split."""
    distractor_fraction: float = 0.5
    """Share of test images that get a near-duplicate (one attribute or relation changed) in the test split."""
    twin_prob: float = 0.25
    """Chance that a new shape copies an earlier one's shape and colour (only relations tell them apart)."""
    min_visible: float = 0.6
    """Least visible share of every shape; occlusion never hides more."""
    captions_per_image: int = 1
    """Pretraining captions per image (1-99)."""
    caption_wrong_fraction: float = 0.1
    """Share of pretraining captions with one false part (colour, shape, size or relation)."""
    questions_per_image: int = 5
    """VQA questions per image (0-99)."""
    answer_noise: float = 0.2
    """Chance that one of the ten VQA annotators deviates (a synonym, a number word or a mistake)."""
    yes_no_noise: float = 0.02
    """The same for yes/no questions.  They have no other words for the same answer, so every deviation
    is the opposite answer and gives it partial credit; at ``answer_noise`` a constant "yes" would score
    about 78 on them."""
    refs_per_image: int = 2
    """RefCOCO+ referred objects per image (0-99)."""
    vcr_per_image: int = 2
    """VCR-style multiple-choice questions per image (0-99)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = int if f.type == "int" else float
            if isinstance(value, bool) or not isinstance(value, int | float) or (wanted is int and value != int(value)):
                raise SyntheticConfigError(
                    f"{f.name} must be {'an integer' if wanted is int else 'a number'}, got {value!r}"
                )
        self._check_ranges()

    def _check_ranges(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SyntheticConfigError(message)

        need(0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}")
        need(3 <= self.n <= 9_999_999, f"n must be in [3, 9999999], got {self.n}")
        need(32 <= self.size <= 1024, f"size must be in [32, 1024] pixels, got {self.size}")
        need(1 <= self.min_objects <= 10, f"min_objects must be in [1, 10], got {self.min_objects}")
        need(
            self.min_objects <= self.max_objects <= 10,
            f"max_objects must be in [min_objects={self.min_objects}, 10], got {self.max_objects}",
        )
        shares = ("val_fraction", "test_fraction", "distractor_fraction", "twin_prob", "caption_wrong_fraction",
                  "answer_noise", "yes_no_noise")  # fmt: skip
        for name in shares:
            need(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        need(0.3 <= self.min_visible <= 1, f"min_visible must be in [0.3, 1], got {self.min_visible}")
        need(
            1 <= self.captions_per_image <= 99, f"captions_per_image must be in [1, 99], got {self.captions_per_image}"
        )
        for name in ("questions_per_image", "refs_per_image", "vcr_per_image"):
            need(0 <= getattr(self, name) <= 99, f"{name} must be in [0, 99], got {getattr(self, name)}")
        counts = self.split_counts
        need(counts["train"] >= 1, f"val_fraction + test_fraction leave no training image out of n={self.n}")
        for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
            need(
                fraction == 0 or counts[split] >= 1,
                f"{split}_fraction={fraction} of n={self.n} rounds to no {split} image: raise n or set it to 0",
            )

    @classmethod
    def from_uri(cls, uri: str) -> SyntheticConfig:
        """Parse ``synthetic://shapes?seed=0&n=3000&size=96``; unknown, repeated or malformed parameters are
        a :class:`SyntheticConfigError` naming them."""
        parts = urlsplit(uri)
        if parts.scheme != SCHEME:
            raise SyntheticConfigError(f"not a synthetic URI (scheme must be '{SCHEME}://'): {uri!r}")
        if parts.netloc not in WORLDS:
            raise SyntheticConfigError(
                f"unknown synthetic world {parts.netloc!r} in {uri!r}; known: {', '.join(WORLDS)}"
            )
        if parts.path not in ("", "/") or parts.fragment:
            raise SyntheticConfigError(f"a synthetic URI has only a world and ?parameters, got {uri!r}")
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as err:
            raise SyntheticConfigError(f"malformed query in {uri!r}: {err}") from None
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in pairs:
            if key not in types:
                raise SyntheticConfigError(
                    f"unknown parameter {key!r} in {uri!r}; known parameters: {', '.join(types)}"
                )
            if key in values:
                raise SyntheticConfigError(f"parameter {key!r} is given twice in {uri!r}")
            values[key] = _parse_value(key, raw, types[key])
        return cls(**values)

    def to_uri(self) -> str:
        """The canonical URI: seed, n and size always, other parameters when they differ from the default."""
        defaults = SyntheticConfig()
        query = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in ("seed", "n", "size") or getattr(self, f.name) != getattr(defaults, f.name)
        }
        return f"{SCHEME}://{WORLDS[0]}?{urlencode(query)}"

    @property
    def split_counts(self) -> dict[str, int]:
        """Base images per split (the test count excludes the distractors)."""
        val, test = round(self.n * self.val_fraction), round(self.n * self.test_fraction)
        return {"train": self.n - val - test, "val": val, "test": test}

    @property
    def distractors(self) -> int:
        """How many near-duplicate distractor images follow the base images."""
        return round(self.split_counts["test"] * self.distractor_fraction)

    @property
    def total_images(self) -> int:
        """Base images plus distractors: the indices are ``0 .. total_images - 1``."""
        return self.n + self.distractors

    def split_of(self, index: int) -> str:
        """``train`` / ``val`` / ``test`` of image ``index`` (contiguous blocks; distractors are test)."""
        counts = self.split_counts
        if index < counts["train"]:
            return "train"
        return "val" if index < counts["train"] + counts["val"] else "test"

    def base_of(self, index: int) -> int | None:
        """For a distractor, the test image it is a near-duplicate of; None for a base image."""
        if index < self.n:
            return None
        return self.n - self.split_counts["test"] + (index - self.n)


def _parse_value(key: str, raw: str, kind: Any) -> int | float:
    if kind == "int":
        if not re.fullmatch(r"[+-]?\d+", raw.strip()):
            raise SyntheticConfigError(f"parameter {key!r} must be an integer, got {raw!r}")
        return int(raw)
    try:
        value = float(raw)
    except ValueError:
        raise SyntheticConfigError(f"parameter {key!r} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SyntheticConfigError(f"parameter {key!r} must be a finite number, got {raw!r}")
    return value


@dataclass(frozen=True)
class SyntheticImage:
    """One generated image with its ground truth."""

    image_id: str
    """``syn-000123``."""
    index: int
    """Position in the world; also the integer COCO image id."""
    split: str
    """train, val or test."""
    png: bytes
    """The encoded image."""
    scene: Scene
    """What is in it (objects in drawing order, with visible boxes and occlusion)."""
    coco_image: dict[str, Any]
    """Its COCO ``images`` entry."""
    annotations: list[dict[str, Any]]
    """Its COCO instance annotations (bbox [x, y, w, h], area, category_id, attributes, occluded_by...)."""


def generate_scene(config: SyntheticConfig, index: int) -> Scene:
    """The content of image ``index`` (a distractor is its base image with one change)."""
    if not 0 <= index < config.total_images:
        raise IndexError(f"image index {index} outside 0..{config.total_images - 1}")
    base = config.base_of(index)
    if base is not None:
        return near_duplicate(generate_scene(config, base), index, config.seed, config.min_visible)
    c = config
    return sample_scene(c.seed, index, c.size, c.min_objects, c.max_objects, c.min_visible, c.twin_prob)


def generate_image(config: SyntheticConfig, index: int) -> SyntheticImage:
    """Image ``index`` as PNG bytes plus its COCO ground truth; identical on every call (same numpy and Pillow)."""
    scene = generate_scene(config, index)
    return SyntheticImage(
        image_id=image_id_of(index),
        index=index,
        split=config.split_of(index),
        png=render_png(scene, config.seed),
        scene=scene,
        coco_image=coco_image(scene),
        annotations=coco_annotations(scene),
    )


def _record(config: SyntheticConfig, index: int) -> WorldRecord:
    scene = generate_scene(config, index)
    return WorldRecord(scene, config.split_of(index), image_tasks(config, scene))


def _records_and_pngs(config: SyntheticConfig, start: int, stop: int) -> list[tuple[WorldRecord, bytes]]:
    return [(r, render_png(r.scene, config.seed)) for r in (_record(config, i) for i in range(start, stop))]


def _records(config: SyntheticConfig, start: int, stop: int) -> list[WorldRecord]:
    return [_record(config, i) for i in range(start, stop)]


def _pngs(config: SyntheticConfig, scenes: list[Scene]) -> list[bytes]:
    return [render_png(scene, config.seed) for scene in scenes]


def default_workers() -> int:
    """Worker processes for generation: the CPUs this process may use, at most 8."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, available))


def _parallel(
    work: Callable[..., list[T]], config: SyntheticConfig, jobs: list[tuple], workers: int | None
) -> Iterator[T]:
    """``work(config, *job)`` for every job, results flattened in job order; in worker processes when the
    world is large enough to pay for them.

    Workers are forked where the platform can (spawned workers re-import the caller's ``__main__``, which
    breaks scripts without a main guard); they run only numpy and Pillow code, never the parent's threads'
    libraries.  At most two jobs per worker are in flight, so memory stays bounded however large the world."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or config.total_images < PARALLEL_FROM:
        for job in jobs:
            yield from work(config, *job)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    try:
        todo = iter(jobs)
        pending = deque(pool.submit(work, config, *job) for job in islice(todo, 2 * workers))
        while pending:
            done = pending.popleft().result()
            following = next(todo, None)
            if following is not None:
                pending.append(pool.submit(work, config, *following))
            yield from done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ranges(config: SyntheticConfig) -> list[tuple[int, int]]:
    total = config.total_images
    return [(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]


def generate_world(config: SyntheticConfig, workers: int | None = None) -> Iterator[tuple[WorldRecord, bytes]]:
    """``(record, png bytes)`` for every image, in index order (one pass: each scene is built once)."""
    return _parallel(_records_and_pngs, config, _ranges(config), workers)


def generate_records(config: SyntheticConfig, workers: int | None = None) -> list[WorldRecord]:
    """Scene, split and language items of every image (no pixels), in index order."""
    return list(_parallel(_records, config, _ranges(config), workers))


class SyntheticSource:
    """The synthetic world as a :class:`~components.sources.base.Source`.

    The ground truth and language items of every image are kept in memory once computed (a few MB per
    thousand images); the pixels never are: :meth:`images` streams them."""

    def __init__(self, uri: str, workers: int | None = None) -> None:
        self.uri = uri
        self.config = SyntheticConfig.from_uri(uri)
        self.workers = workers
        self._records: list[WorldRecord] | None = None

    def records(self) -> list[WorldRecord]:
        """Every image's ground truth and language items (computed once, then kept)."""
        if self._records is None:
            self._records = generate_records(self.config, self.workers)
        return self._records

    def _source_image(self, index: int, png: bytes) -> SourceImage:
        image_id = image_id_of(index)
        return SourceImage(image_id, png, self.config.split_of(index), f"{self.uri}#{image_id}", f"{image_id}.png")

    def images(self) -> Iterator[SourceImage]:
        """Every image (base images, then distractors) as PNG bytes, in index order."""
        if self._records is not None:  # scenes known: only render them
            scenes = [r.scene for r in self._records]
            jobs = [(scenes[start:stop],) for start, stop in _ranges(self.config)]
            for index, png in enumerate(_parallel(_pngs, self.config, jobs, self.workers)):
                yield self._source_image(index, png)
            return
        collected = []
        for record, png in generate_world(self.config, self.workers):
            collected.append(record)
            yield self._source_image(record.scene.index, png)
        self._records = collected  # a full pass also yields the records: captions and files come free

    def captions(self) -> Iterator[SourceCaption]:
        """The pretraining captions (``captions_per_image`` per image, some partly wrong)."""
        for record in self.records():
            for caption in record.tasks.captions:
                yield SourceCaption(caption["caption_id"], record.scene.image_id, caption["caption"], record.split)

    def native_files(self) -> SourceFiles:
        """COCO instances and captions under ``annotations/``, the four task datasets under ``tasks/``."""
        return SourceFiles(files=native_files(self.records(), self.uri))
