"""Caption-based image retrieval on Flickr30k (Karpathy's split JSON): 4-way training, all-pairs evaluation.

Training (the paper: "4-way multiple-choice ... by randomly sampling three distractors for each image-caption
pair: substituting a random caption, a random image, or a hard negative from among the 100 nearest neighbours
of the target image"; the multi-task release's ``retreival_dataset.py`` builds exactly these four rows):

    choice 0: (caption, its image)                       <- always the right one (labels["choice"] = 0)
    choice 1: (a caption of a random other image, image)
    choice 2: (caption, a random other image)
    choice 3: (a caption of a hard-negative image, image)

The original's hard negatives are a precomputed pool per image (``hard_negative.pkl``).  Here the pool of an
image is its near-duplicate distractors of the same split (``near_duplicate_of``, both directions) followed by
its nearest images by shared caption words (TF-IDF cosine over the words of the image's five sentences), up to
``hard_pool_size`` (100).  The pair scores are independent per row, so choice 0 always being right teaches no
position.  Loss: softmax cross-entropy over each item's four pair logits (``components.data.tasks.vcr.choice_loss``).

Evaluation: every caption of the split against every image of the split (:class:`RetrievalGallery`); scores go
into a (captions, images) matrix; ``caption_image[c]`` is caption c's image (the ground truth for
``components.metrics.retrieval``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from components.data.collate import model_inputs, to_device
from components.data.common import (
    DataError,
    DatasetReport,
    EpochItems,
    check_tokenizer,
    encode_text,
    item_generator,
    non_empty,
    randint,
    require_features,
)
from components.data.regions import RegionInputs, RegionSource
from components.data.tasks.common import (
    PredictionRun,
    Predictions,
    ServingAdapter,
    TaskFiles,
    TaskSpec,
    finite,
    percent,
    spread,
)
from components.data.tasks.vcr import choice_loss, stack_choices
from components.metrics import pictures, retrieval_scores

FLICKR_FILE = "tasks/flickr30k/dataset_flickr30k.json"
NUM_CHOICES = 4
METRIC = "recall@1"
#: How many best images a retrieval record lists (``top_k``): enough for R@10 and for the pictures.
TOP_K = 10
#: Images shown per caption in the retrieval picture, and captions shown at most.
PICTURE_TOP, PICTURE_EXAMPLES = 5, 8
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class RetrievalDataConfig:
    """Which Flickr30k split and how training distractors are drawn."""

    split: str = "train"
    """Karpathy split of the images (``train``, ``val``, ``test``)."""
    max_text_length: int = 30
    """Tokens per caption including [CLS] / [SEP]."""
    hard_pool_size: int = 100
    """Hard-negative candidates kept per image (near duplicates first, then nearest by caption words)."""
    seed: int = 0
    """Seed of the distractor draws (with the epoch and the item index)."""
    skip_missing_images: bool = False
    """Drop images without features (counted) instead of raising."""

    def __post_init__(self) -> None:
        if self.max_text_length < 3:
            raise ValueError(f"max_text_length must be >= 3, got {self.max_text_length}")
        if self.hard_pool_size < 1:
            raise ValueError(f"hard_pool_size must be >= 1, got {self.hard_pool_size}")


class FlickrSplit:
    """The images and captions of one split, after dropping rejected images and images without features."""

    def __init__(self, files: TaskFiles, regions: RegionSource, config: RetrievalDataConfig):
        data = files.read_json(FLICKR_FILE)
        entries = [e for e in data.get("images", []) if isinstance(e, dict) and e.get("split") == config.split]
        rejected = files.rejected("flickr30k")
        self.report = DatasetReport(rows=len(entries))
        kept = []
        for entry in entries:
            if str(entry.get("imgid")) in rejected:
                self.report.drop("rejected")
            elif not entry.get("sentences"):
                self.report.drop("no_sentences")
            else:
                kept.append(entry)
        ids = [files.image_id(e.get("filename")) for e in kept]
        keep, missing = require_features(ids, regions, config.skip_missing_images, "Flickr30k image")
        self.report.drop("missing_features", missing)
        self.entries = [e for e, ok in zip(kept, keep, strict=True) if ok]
        self.image_ids = [i for i, ok in zip(ids, keep, strict=True) if ok]
        self.report.kept = len(self.entries)
        non_empty(len(self.entries), "Flickr30k images", config.split, self.report)
        self.captions: list[str] = []
        self.caption_image: list[int] = []
        self.image_captions: list[list[int]] = []
        for i, entry in enumerate(self.entries):
            first = len(self.captions)
            for sent in entry["sentences"]:
                self.captions.append(sent.get("raw") or " ".join(sent.get("tokens", [])))
                self.caption_image.append(i)
            self.image_captions.append(list(range(first, len(self.captions))))
        by_name = {e.get("filename"): i for i, e in enumerate(self.entries)}
        self.near_duplicates: list[list[int]] = [[] for _ in self.entries]
        for i, entry in enumerate(self.entries):
            j = by_name.get(entry.get("near_duplicate_of"))
            if j is not None and j != i:
                self.near_duplicates[i].append(j)
                self.near_duplicates[j].append(i)


def word_neighbours(texts: list[str], k: int, chunk: int = 1024) -> list[list[int]]:
    """For each text, the indices of the (at most) ``k`` most similar other texts by TF-IDF cosine.

    Sparse rows times dense chunks (CSR); Flickr30k-sized input takes about a minute on 2 CPU threads
    (``benchmarks/data_pipeline.py``), once per dataset."""
    n = len(texts)
    k = min(k, n - 1)
    if k <= 0:
        return [[] for _ in texts]
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, text in enumerate(texts):
        words = {vocab.setdefault(w, len(vocab)) for w in _WORD.findall(text.lower())}
        cols += sorted(words)
        rows += [i] * len(words)
    rows_a, cols_a = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    df = np.bincount(cols_a, minlength=len(vocab))
    values = (np.log(n / np.maximum(df, 1)) + 1.0)[cols_a]
    norms = np.sqrt(np.bincount(rows_a, weights=values**2, minlength=n))
    values = (values / np.maximum(norms[rows_a], 1e-12)).astype(np.float32)
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows_a, minlength=n))])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is the fast path here (10x COO)
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(cols_a),
            torch.from_numpy(values),
            (n, max(len(vocab), 1)),
            check_invariants=True,
        )
        dense_rows = np.zeros((min(chunk, n), max(len(vocab), 1)), dtype=np.float32)
        out: list[list[int]] = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = dense_rows[: stop - start]
            block[:] = 0
            lo, hi = crow[start], crow[stop]
            block[rows_a[lo:hi] - start, cols_a[lo:hi]] = values[lo:hi]
            sims = (matrix @ torch.from_numpy(block).t()).t()  # (chunk, n)
            sims[torch.arange(stop - start), torch.arange(start, stop)] = -1.0  # never oneself
            out += sims.topk(k, dim=1).indices.tolist()
    return out


def stack_regions(regions: list[RegionInputs]) -> dict[str, Tensor]:
    """Several images' regions -> (K, N, ...) tensors padded to the most regions among them."""
    longest = max(r.num_regions for r in regions)

    def pad(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])

    return {
        "features": torch.stack([pad(r.features) for r in regions]),
        "boxes": torch.stack([pad(r.boxes) for r in regions]),
        "region_mask": torch.stack([pad(r.region_mask) for r in regions]),
    }


class RetrievalTrainDataset(EpochItems, Dataset):
    """One 4-way multiple-choice item per caption of the split; see the module docstring."""

    def __init__(
        self, files: TaskFiles, regions: RegionSource, tokenizer: Any, config: RetrievalDataConfig | None = None
    ):
        self.config = config = config or RetrievalDataConfig()
        self.seed = config.seed
        check_tokenizer(tokenizer, regions.config)
        self.tokenizer, self.regions = tokenizer, regions
        self.split = FlickrSplit(files, regions, config)
        self.report = self.split.report
        if len(self.split.entries) < 2:
            raise DataError(f"retrieval training needs at least two images in split {config.split!r}")
        texts = [" ".join(self.split.captions[c] for c in caps) for caps in self.split.image_captions]
        nearest = word_neighbours(texts, config.hard_pool_size)
        self.hard_pool = [
            list(dict.fromkeys(dups + near))[: config.hard_pool_size]
            for dups, near in zip(self.split.near_duplicates, nearest, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.split.captions)

    def _other_image(self, image: int, g: torch.Generator) -> int:
        other = randint(g, len(self.split.entries) - 1)
        return other + (other >= image)  # uniform over every image but ``image``

    def _caption_of(self, image: int, g: torch.Generator) -> int:
        captions = self.split.image_captions[image]
        return captions[randint(g, len(captions))]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key, len(self))
        g = item_generator(self.seed, epoch, index)
        split, image = self.split, self.split.caption_image[index]
        random_caption = self._caption_of(self._other_image(image, g), g)
        random_image = self._other_image(image, g)
        pool = self.hard_pool[image]
        hard = pool[randint(g, len(pool))] if pool else self._other_image(image, g)
        hard_caption = self._caption_of(hard, g)
        captions = [index, random_caption, index, hard_caption]
        images = [image, image, random_image, image]
        texts = [encode_text(self.tokenizer, split.captions[c], self.config.max_text_length) for c in captions]
        loaded = {i: self.regions[split.image_ids[i]] for i in set(images)}
        return {
            **stack_choices(texts, self.tokenizer.pad_token_id),
            **stack_regions([loaded[i] for i in images]),
            "labels": {"choice": torch.tensor(0)},
            "meta": {
                "caption_index": index,
                "image_id": split.image_ids[image],
                "choice_images": [split.image_ids[i] for i in images],
                "choice_captions": captions,
                "num_choices": NUM_CHOICES,
            },
        }


class RetrievalGallery:
    """Evaluation: every caption of the split scored against every image of the split.

    ``captions[c]`` / ``caption_image[c]`` (index into ``image_ids``) are the ground truth.  :meth:`batches`
    yields collated batches of one caption against a chunk of images (each chunk's regions are read and padded
    once and reused for every caption); put ``pair_scores(output)`` at ``[meta["caption_index"],
    meta["image_index"]]`` of a (captions, images) score matrix.
    """

    def __init__(
        self, files: TaskFiles, regions: RegionSource, tokenizer: Any, config: RetrievalDataConfig | None = None
    ):
        self.config = config = config or RetrievalDataConfig(split="test")
        check_tokenizer(tokenizer, regions.config)
        self.tokenizer, self.regions = tokenizer, regions
        split = FlickrSplit(files, regions, config)
        self.report = split.report
        self.image_ids, self.captions, self.caption_image = split.image_ids, split.captions, split.caption_image
        self.image_captions = split.image_captions

    @property
    def num_pairs(self) -> int:
        return len(self.captions) * len(self.image_ids)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """All (caption, image) pairs of this rank's captions (``c % world_size == rank``), ``batch_size`` images
        per batch, padded to the batch's longest; ``meta["caption_index"]`` / ``meta["image_index"]`` (B,) say
        where each score goes.  Batches have the collator's layout (:func:`components.data.collate.model_inputs`)."""
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}/{world_size}")
        mine = range(rank, len(self.captions), world_size)
        texts = {c: encode_text(self.tokenizer, self.captions[c], self.config.max_text_length) for c in mine}
        for start in range(0, len(self.image_ids), batch_size):
            chunk = range(start, min(start + batch_size, len(self.image_ids)))
            visual = stack_regions([self.regions[self.image_ids[i]] for i in chunk])  # read and padded once
            for c in mine:
                yield {
                    **{
                        k: texts[c][k].expand(len(chunk), -1) for k in ("input_ids", "token_type_ids", "attention_mask")
                    },
                    **visual,
                    "labels": {},
                    "meta": {
                        "caption_index": torch.full((len(chunk),), c, dtype=torch.long),
                        "image_index": torch.arange(chunk.start, chunk.stop),
                    },
                }


def pair_scores(output: Any, zero_shot: bool = False) -> Tensor:
    """(B,) retrieval score of each pair: the fine-tuned pair logit, or for zero-shot retrieval the alignment
    head's probability that the caption matches (``softmax(alignment_logits)[:, 0]``, as the original)."""
    if zero_shot:
        return torch.softmax(output.alignment_logits.float(), dim=-1)[:, 0]
    return output.pair_logit[:, 0]


def _dataset(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, text_length: int, seed: int,
             vocab: Any = None) -> RetrievalTrainDataset:  # fmt: skip
    return RetrievalTrainDataset(
        files, regions, tokenizer, RetrievalDataConfig(split=split, max_text_length=text_length, seed=seed)
    )


def _evaluation_data(files: TaskFiles, regions: RegionSource, tokenizer: Any, split: str, length: dict[str, Any],
                     vocab: Any = None) -> RetrievalGallery:  # fmt: skip
    return RetrievalGallery(files, regions, tokenizer, RetrievalDataConfig(split=split, **length))


def _predict(run: PredictionRun) -> Predictions:
    """Every caption against every image of the gallery: the pair logit, or with ``zero_shot`` the pretrained
    alignment head's match probability (:func:`pair_scores`); prediction = the best image."""
    gallery: RetrievalGallery = run.dataset
    captions = len(gallery.captions) if run.limit is None else min(run.limit, len(gallery.captions))
    images = len(gallery.image_ids)
    scores = np.full((captions, images), np.nan, dtype=np.float32)
    total = math.ceil(images / run.batch_size) * captions
    with tqdm(total=total, desc="evaluate retrieval", disable=not run.progress) as bar:
        for batch in gallery.batches(run.batch_size):
            caption, image = batch["meta"]["caption_index"], batch["meta"]["image_index"]
            if int(caption[0]) >= captions:  # smoke runs: the first captions only (every batch is one caption)
                continue
            out = run.model(**model_inputs(to_device(batch, run.device)), heads=run.heads)
            scores[caption.numpy(), image.numpy()] = finite(pair_scores(out, run.zero_shot), "pair scores").numpy()
            bar.update(1)
    if np.isnan(scores).any():
        raise RuntimeError("the gallery did not score every caption-image pair")  # a bug, not bad input
    records = []
    for c in range(captions):
        order = np.argsort(-scores[c], kind="stable")[:TOP_K]
        truth = gallery.caption_image[c]
        records.append({
            "caption_index": c,
            "caption": gallery.captions[c],
            "image_id": gallery.image_ids[truth],
            "prediction": gallery.image_ids[int(order[0])],
            "target": gallery.image_ids[truth],
            "score": float(scores[c, order[0]]),
            "target_score": float(scores[c, truth]),
            "top_k": [gallery.image_ids[int(i)] for i in order],
            "top_k_scores": [float(scores[c, i]) for i in order],
        })  # fmt: skip
    return Predictions(
        "retrieval",
        records,
        zero_shot=run.zero_shot,
        scores=scores,
        caption_image=list(gallery.caption_image[:captions]),
        image_ids=list(gallery.image_ids),
    )


def _score(predictions: Predictions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    if predictions.scores is None:
        raise ValueError("retrieval predictions carry no score matrix")
    result = retrieval_scores(predictions.scores, predictions.caption_image)
    metrics: dict[str, float] = {"chance": percent(result["chance"]["recall_at_1"])}
    for prefix, part in (("", result["image_retrieval"]), ("text_", result["text_retrieval"])):
        for key, value in part.items():
            if key.startswith("recall_at_"):
                metrics[f"{prefix}recall@{key.removeprefix('recall_at_')}"] = percent(value)
            elif key in ("median_rank", "mean_rank"):
                metrics[f"{prefix}{key}"] = float(value)
    return metrics, [{"rank": rank} for rank in result["image_retrieval"]["ranks"]]


def _pictures(predictions: Predictions, images: Callable[[str], bytes], out_dir: Path, count: int) -> list[Path]:
    """Captions with their best images, the correct one framed."""
    records = predictions.records
    ranked_examples: list[pictures.RetrievalExample] = []
    for r in (records[i] for i in spread(len(records), min(count, PICTURE_EXAMPLES))):
        ranked = r["top_k"][:PICTURE_TOP]
        correct = ranked.index(r["target"]) if r["target"] in ranked else None
        ranked_examples.append(pictures.RetrievalExample(r["caption"], [images(i) for i in ranked], correct,
                                                         r["top_k_scores"][:PICTURE_TOP]))  # fmt: skip
    return [pictures.retrieval_examples_png(out_dir, ranked_examples)]


def _attention_inputs(predictions: Predictions, index: int, data: Any) -> tuple[dict[str, Tensor], str, str]:
    """The caption with its true image."""
    record = predictions.records[index]
    text = encode_text(data.tokenizer, record["caption"], data.config.max_text_length)
    regions = data.regions[record["target"]]
    inputs: dict[str, Tensor] = {**{k: text[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
              "features": regions.features, "boxes": regions.boxes, "region_mask": regions.region_mask}  # fmt: skip
    return {k: v[None] for k, v in inputs.items()}, record["target"], record["caption"]


def _serve(out: Any, batch: dict[str, Any], choices: list[tuple[str, ...]], vocab: Any,
           zero_shot: bool) -> list[dict[str, Any]]:  # fmt: skip
    return [{"score": float(s)} for s in pair_scores(out, zero_shot=zero_shot).tolist()]


RETRIEVAL_TASK = TaskSpec(
    name="retrieval",
    heads=("pair",),
    loss=choice_loss,
    metric=METRIC,
    title="Image retrieval",
    model_name="vilbert-retrieval",
    files=(FLICKR_FILE,),
    text_length=30,
    dataset=_dataset,
    evaluation_data=_evaluation_data,
    predict=_predict,
    score=_score,
    pictures=_pictures,
    attention_inputs=_attention_inputs,
    serving=ServingAdapter(
        outputs=(("score", "double"),),
        example_text="a red circle next to a blue square",
        decode=_serve,
    ),
    gallery=True,
    zero_shot=True,
)
