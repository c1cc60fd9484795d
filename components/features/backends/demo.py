"""Backend ``demo``: a small detector for the synthetic world, trained in the features step itself.

It works like the real one, on raw images without annotations (the served model extracts features from
a user's image with it): colour-segmentation proposals (:mod:`.demo_proposals`), then a region network
that resamples every proposal to a small crop (``torchvision.ops.roi_align`` on the image, so a shape
looks the same at every size), runs a small CNN on it, adds the box geometry, and maps both through one
hidden layer whose output is the region feature (D = 256, the ``demo`` model preset's
``vision.feature_size``).  (Pooling from a shared feature map, Fast R-CNN style, was tried first: on
this world's 10-40 px shapes its ground-truth-box class accuracy was 0.58 against 0.77 for crops, both
with 64 channels and 300 training images, on the same 100 held-out images.)  Two heads sit on that layer, as on the Visual Genome
detector of bottom-up-attention: object classes (softmax: the class distribution, C = 64, the preset's
``vision.target_size``) and attributes (multi-label, a training signal only).

Classes: index 0 is background; then every "<first attribute> <category>" pair of the annotations
(the synthetic world: colour x shape, 8 x 7 = 56), in category-id order then attribute name order; the
remaining indices up to C are unused (never a training target, so their probabilities are learnt to be
near 0).  More pairs than C - 1 is an error.  Region selection is bottom-up-attention's (per-class NMS,
confidence threshold, min / max boxes), shared with the ``detector`` backend.

The trained detector is a folder: ``model.safetensors`` (its sha256 goes into the feature spec) and
``config.json`` (architecture, class and attribute names, proposal options, training report).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from components.features.backends.base import (
    BackendError,
    BoxLimits,
    ImageRegions,
    PrepareContext,
    PreparedBackend,
    best_class_scores,
    select_regions,
    sha256_file,
)
from components.features.backends.demo_proposals import ProposalOptions, propose

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
#: Where ``prepare`` saves a freshly trained detector, relative to the feature store root.
STORE_SUBDIR = "demo_detector"
GEOMETRY_SIZE = 7  # x1, y1, x2, y2, w, h (fractions of the image) and sqrt(area fraction)
GEOMETRY_WIDTH = 32  # width of the geometry's own layer
CROP_MARGIN = 0.1  # context around a box in its crop, as a fraction of the box's width / height


@dataclass(frozen=True)
class DemoOptions:
    """Options of the ``demo`` backend (architecture, training, proposals)."""

    model_dir: str | None = None
    """A trained demo detector folder (local or s3://) to use instead of training one."""
    feature_size: int = 256
    """D: width of the hidden layer whose output is the region feature (demo preset: 256)."""
    num_classes: int = 64
    """C: classes of the class distribution, background included (demo preset: 64)."""
    channels: int = 32
    """Channels of the convolutional feature map (stride 4)."""
    crop_size: int = 16
    """Each region is resampled to crop_size x crop_size pixels (a multiple of 4) for the region CNN."""
    max_side: int = 256
    """Images with a longer side are resized down to it before detection (boxes are mapped back)."""
    train_images: int = 400
    """Training images at most (manifest split ``train``)."""
    eval_images: int = 100
    """Held-out images at most (split ``val``, else ``test``) on which box recall is measured."""
    epochs: int = 10
    """Passes over the training images."""
    batch_images: int = 16
    """Images per optimisation step."""
    learning_rate: float = 5e-3
    """AdamW learning rate (cosine decay to 0)."""
    train_threads: int = 1
    """torch threads while training: the network's operations are so small that more threads spend more on
    synchronisation than they save (measured on 2 busy cores: 22 s of CPU with 1 thread, 70 s with 2)."""
    proposals: ProposalOptions = field(default_factory=ProposalOptions)
    """How the colour segmentation proposes boxes."""

    def __post_init__(self) -> None:
        for name in (
            "feature_size",
            "num_classes",
            "channels",
            "crop_size",
            "max_side",
            "epochs",
            "batch_images",
            "train_threads",
        ):
            if getattr(self, name) < 1:
                raise BackendError(f"demo: {name} must be >= 1")
        if self.num_classes < 2:
            raise BackendError("demo: num_classes must be >= 2 (background and one object class)")
        if self.train_images < 1 or self.eval_images < 0:
            raise BackendError("demo: need train_images >= 1 and eval_images >= 0")
        if not self.learning_rate > 0:
            raise BackendError("demo: learning_rate must be > 0")


@dataclass(frozen=True)
class DemoArchitecture:
    """What ``config.json`` must describe to rebuild a trained demo detector."""

    classes: tuple[str, ...]
    """Class names, index 0 = background, padded with ``unused-<k>`` to C."""
    attributes: tuple[str, ...]
    """Attribute names of the attribute head."""
    feature_size: int = 256
    channels: int = 32
    crop_size: int = 16
    max_side: int = 256
    proposals: ProposalOptions = field(default_factory=ProposalOptions)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DemoArchitecture:
        data = dict(data)
        data["classes"] = tuple(data["classes"])
        data["attributes"] = tuple(data["attributes"])
        data["proposals"] = ProposalOptions(**data.get("proposals", {}))
        return cls(**data)


class DemoRegionNet(nn.Module):
    """RoI crops of the image -> small CNN -> [conv features, geometry] -> hidden (the feature) -> heads.

    Every proposal is resampled to ``crop_size`` x ``crop_size`` pixels with RoI-align (a margin of
    context around the box included), so a shape looks the same at every size; the box geometry is
    given to the hidden layer separately (sizes are attributes too).
    """

    def __init__(self, arch: DemoArchitecture) -> None:
        super().__init__()
        c = arch.channels

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.crop_size = arch.crop_size
        self.cnn = nn.Sequential(*block(3, c // 2, 1), *block(c // 2, c, 2), *block(c, c, 2))  # crop/4 per side
        # The box geometry gets its own small layer: as 7 raw inputs beside hundreds of conv features it is
        # learnt too slowly, and size ("small" / "large") depends on it alone.
        self.geometry = nn.Sequential(nn.Linear(GEOMETRY_SIZE, GEOMETRY_WIDTH), nn.ReLU(inplace=True))
        self.hidden = nn.Linear(c * (arch.crop_size // 4) ** 2 + GEOMETRY_WIDTH, arch.feature_size)
        self.classifier = nn.Linear(arch.feature_size, len(arch.classes))
        self.attribute_head = nn.Linear(arch.feature_size, max(len(arch.attributes), 1))

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """images (B, 3, H, W) uint8-range floats; boxes: per image (R_i, 4) pixels.

        Returns features (sum R, D), class logits (sum R, C), attribute logits (sum R, A)."""
        _, _, height, width = images.shape
        flat = torch.cat(boxes)
        wh = flat[:, 2:] - flat[:, :2]
        margin = torch.cat([-wh, wh], dim=1) * CROP_MARGIN
        context = [b + m for b, m in zip(boxes, margin.split([len(b) for b in boxes]), strict=True)]
        crops = roi_align(images / 127.5 - 1.0, context, self.crop_size, sampling_ratio=2, aligned=True)
        b = flat / torch.tensor([width, height, width, height], dtype=images.dtype)
        wh = wh / torch.tensor([width, height], dtype=images.dtype)
        geometry = torch.cat([b, wh, (wh[:, :1] * wh[:, 1:]).clamp(min=0).sqrt()], dim=1)  # (sum R, 7) in [0, 1]
        geometry = self.geometry(geometry * 4 - 2)  # (sum R, 32)
        hidden = F.relu(self.hidden(torch.cat([self.cnn(crops).flatten(1), geometry], dim=1)))  # (sum R, D)
        return hidden, self.classifier(hidden), self.attribute_head(hidden)


@dataclass
class Detections:
    """One image's detection output before it becomes :class:`ImageRegions` (for evaluation)."""

    regions: ImageRegions
    scores: np.ndarray
    """[R] confidence of each kept region (best class score after per-class NMS)."""
    proposals: np.ndarray
    """[N, 4] every proposal the regions were chosen from."""


class DemoDetector:
    """A trained demo detector: images in, regions out.  ``save`` / ``load`` a folder."""

    def __init__(self, arch: DemoArchitecture, net: DemoRegionNet | None = None, device: str = "cpu") -> None:
        self.arch = arch
        self.net = (net or DemoRegionNet(arch)).to(device).eval()
        self.device = torch.device(device)

    def prepare_image(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The image the network sees (shrunk to ``max_side`` if larger) and the scale back to the original."""
        height, width = image.shape[:2]
        longest = max(height, width)
        if longest <= self.arch.max_side:
            return image, 1.0
        from PIL import Image

        scale = self.arch.max_side / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST)), longest / self.arch.max_side

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], limits: BoxLimits) -> list[Detections]:
        """Proposals, region features, class distributions and the kept regions of each image."""
        prepared = [self.prepare_image(im) for im in images]
        proposals = [propose(im, self.arch.proposals) for im, _ in prepared]
        out: list[Detections | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (im, _) in enumerate(prepared):  # one batch per image size: no padding the net never saw
            by_shape.setdefault(im.shape, []).append(i)
        for members in by_shape.values():
            batch = torch.stack([torch.from_numpy(prepared[i][0]).permute(2, 0, 1) for i in members]).float()
            boxes = [torch.from_numpy(proposals[i]).to(self.device) for i in members]
            feats, logits, _ = self.net(batch.to(self.device), boxes)
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            counts = [len(b) for b in boxes]
            for i, f, p, b in zip(members, feats.float().cpu().split(counts), probs.split(counts), boxes, strict=True):
                b = b.cpu()
                scores = best_class_scores(b, p, limits.nms_threshold, floor=0.0)
                keep = select_regions(scores, limits)
                scale, (h, w) = prepared[i][1], images[i].shape[:2]
                kept = (b[keep] * scale).numpy()
                kept[:, 0::2] = kept[:, 0::2].clip(0, w)
                kept[:, 1::2] = kept[:, 1::2].clip(0, h)
                regions = ImageRegions(kept, f[keep].numpy(), p[keep].numpy())
                out[i] = Detections(regions, scores[keep].numpy(), proposals[i] * scale)
        return [d for d in out if d is not None]

    def save(self, folder: str | Path, report: dict | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``folder`` (local); returns the weights path."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        config = {"architecture": self.arch.to_json(), "report": report or {}}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder / WEIGHTS_FILE

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> DemoDetector:
        """Rebuild a saved detector from a local folder."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise BackendError(f"{folder} is not a demo detector (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
        arch = DemoArchitecture.from_json(json.loads((folder / CONFIG_FILE).read_text())["architecture"])
        net = DemoRegionNet(arch)
        net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return cls(arch, net, device)


class DemoExtractor:
    """The :class:`~components.features.backends.base.Extractor` of a loaded demo detector."""

    def __init__(self, detector: DemoDetector, limits: BoxLimits) -> None:
        self.detector = detector
        self.limits = limits

    def extract(self, images: Sequence[np.ndarray]) -> list[ImageRegions]:
        """Regions of each RGB uint8 image [H, W, 3]."""
        return [d.regions for d in self.detector.detect(images, self.limits)]


def local_detector_dir(uri: str) -> Path:
    """A local folder holding the detector at ``uri`` (downloaded from S3 into a temp folder if needed)."""
    from components import storage

    if not storage.is_s3(uri):
        return Path(uri)
    local = Path(tempfile.mkdtemp(prefix="vilbert-demo-detector-"))
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        storage.download_file(storage.join(uri, name), local / name)
    return local


class DemoBackend:
    """Registry entry ``demo``."""

    name: ClassVar[str] = "demo"
    #: Default torch threads per extraction process: its operations are too small to split well, and on a
    #: busy machine a second thread that waits for a taken core makes every step slow.  Use processes instead.
    max_threads: ClassVar[int | None] = 1

    def __init__(self, options: DemoOptions) -> None:
        self.options = options

    def prepare(self, ctx: PrepareContext) -> PreparedBackend:
        """Use ``model_dir``, or the detector a previous run saved in the store, or train one and save it there."""
        from components import storage

        saved = storage.join(ctx.store, STORE_SUBDIR)
        source = self.options.model_dir or (saved if storage.exists(storage.join(saved, WEIGHTS_FILE)) else None)
        if source is not None:
            local = local_detector_dir(source)
            detector = DemoDetector.load(local)
            report = json.loads((local / CONFIG_FILE).read_text()).get("report", {})
            ctx.log(f"demo: using the trained detector in {source}")
        else:
            from components.features.backends.demo_training import train_demo_detector

            detector, report = train_demo_detector(ctx, self.options)
            local = ctx.work_dir / STORE_SUBDIR
            detector.save(local, report)
            storage.sync_up(local, saved)  # local or S3 store alike; the serving step loads it from there
            source = saved
            ctx.log(f"demo: saved the trained detector to {saved}")
        arch = detector.arch
        if len(arch.classes) != self.options.num_classes or arch.feature_size != self.options.feature_size:
            raise BackendError(
                f"demo detector in {source} has D={arch.feature_size}, C={len(arch.classes)}; "
                f"this run asks for D={self.options.feature_size}, C={self.options.num_classes}"
            )
        return PreparedBackend(
            backend=self.name,
            weights_uri=source,
            weights_sha256=sha256_file(local / WEIGHTS_FILE),
            feature_size=arch.feature_size,
            num_classes=len(arch.classes),
            report=report,
        )

    @staticmethod
    def load(prepared: PreparedBackend, limits: BoxLimits, device: str) -> DemoExtractor:
        """Load the prepared detector in this process."""
        local = local_detector_dir(prepared.weights_uri)
        if sha256_file(local / WEIGHTS_FILE) != prepared.weights_sha256:
            raise BackendError(f"demo detector at {prepared.weights_uri} changed since the run started")
        return DemoExtractor(DemoDetector.load(local, device), limits)
