"""The pretraining dataset: the paper's proxy tasks on (caption, image) pairs.

Per item, as the original ``BertPreprocessBatch`` (vilbert_beta ``concept_cap_dataset.py``):

* alignment: with probability ``negative_prob`` (0.5) the caption is replaced by a caption of ANOTHER image
  (``alignment_labels`` 1; 0 = the image's own caption).  Masking applies to negatives as well, as in the original.
* masked words: the caption is WordPiece-tokenised to ``[CLS] ... [SEP]`` (at most ``max_text_length`` = 36
  tokens); each real token other than [CLS]/[SEP] is chosen with probability 0.15, and a chosen one becomes
  [MASK] 80%, a random token 10%, itself 10% (``masked_lm_labels`` = the original id there, -1 elsewhere).
* masked regions: each real region other than region 0 is chosen with probability 0.15 (``region_labels`` 1,
  -1 elsewhere; labels cover ALL regions, region 0 included, as the model expects) and its feature is zeroed
  with probability 0.9; ``region_targets`` are the store's class distributions (KL objective) or the original
  features (``region_objective="regression"``).

Every random choice depends on ``(seed, epoch, index)`` only (see :mod:`components.data.common`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from components import storage
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
from components.data.masking import IGNORE, mask_regions, mask_tokens
from components.data.pretraining_config import CAPTIONS_VALID, PretrainingDataConfig
from components.data.regions import RegionSource

CAPTION_COLUMNS = ("caption_id", "image_id", "caption", "split")
NEGATIVE_TRIES = 32  # random draws before falling back to an explicit list of other-image captions


def validated_captions(validation_dir: str | Path) -> str:
    """The captions table that the validate step accepted (``<validation_dir>/captions.valid.parquet``)."""
    return storage.join(str(validation_dir), CAPTIONS_VALID)


def read_captions(captions: str | Path | pa.Table) -> pa.Table:
    """A captions table (``captions.parquet`` schema) from a local / ``s3://`` Parquet file, or as given."""
    if not isinstance(captions, pa.Table):
        captions = pq.read_table(io.BytesIO(storage.read_bytes(str(captions))))
    missing = [c for c in CAPTION_COLUMNS if c not in captions.column_names]
    if missing:
        raise DataError(f"the captions table lacks the columns {missing} (see DATA_CONTRACTS.md, captions.parquet)")
    return captions


class PretrainingDataset(EpochItems, Dataset):
    """(caption, image) items with masked words, masked regions and alignment labels; see the module docstring.

    ``captions``: the validated captions table (:func:`validated_captions`), ``regions``: the feature store as
    model inputs.  An item is a dict of the forward arguments of ``ViLBertForPretraining`` (unpadded) plus
    ``meta`` (caption_id, image_id, caption_image_id: whose caption was used); batch it with
    :class:`components.data.collate.Collator`.
    """

    def __init__(
        self,
        captions: str | Path | pa.Table,
        regions: RegionSource,
        tokenizer: Any,
        config: PretrainingDataConfig | None = None,
    ):
        self.config = config = config or PretrainingDataConfig()
        self.seed = config.seed
        check_tokenizer(tokenizer, regions.config)
        self.objective = regions.config.region_objective
        if self.objective == "kl" and regions.spec.uniform_class_probs and not config.allow_uniform_class_probs:
            raise DataError(
                f"the feature store {regions.root} has placeholder (uniform) class distributions "
                f"(backend {regions.spec.backend!r}): they cannot be masked-region KL targets; use a store with "
                "detector classes, the regression objective, or allow_uniform_class_probs=True"
            )
        self.tokenizer, self.regions = tokenizer, regions
        table = read_captions(captions).select(list(CAPTION_COLUMNS))
        table = table.filter(pc.equal(table.column("split"), config.split))
        self.report = DatasetReport(rows=table.num_rows)
        keep, missing = require_features(
            table.column("image_id").to_pylist(), regions, config.skip_missing_images, "caption"
        )
        self.report.drop("missing_features", missing)
        table = table.filter(pa.array(keep, type=pa.bool_()))
        # Arrow arrays, not Python lists: no per-string refcounts for forked DataLoader workers to copy-on-write
        # (Conceptual Captions has 3.3M captions)
        self._caption_ids = table.column("caption_id").combine_chunks()
        self._image_ids = table.column("image_id").combine_chunks()
        self._captions = table.column("caption").combine_chunks()
        self.report.kept = table.num_rows
        non_empty(table.num_rows, "pretraining captions", config.split, self.report)
        # image of each caption as a small int, to draw negatives from other images quickly
        encoded = pc.dictionary_encode(self._image_ids)
        self._image_code = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        if config.negative_prob > 0 and len(encoded.dictionary) < 2:
            raise DataError("alignment negatives need captions of at least two images (or negative_prob=0)")

    def caption(self, index: int) -> str:
        """Caption ``index`` of this dataset (in the table's order)."""
        return self._captions[index].as_py()

    def image_id(self, index: int) -> str:
        """The image of caption ``index``."""
        return self._image_ids[index].as_py()

    def caption_id(self, index: int) -> str:
        return self._caption_ids[index].as_py()

    def __len__(self) -> int:
        return len(self._captions)

    def _negative(self, index: int, g: torch.Generator) -> int:
        """A caption of another image than item ``index``'s."""
        mine = self._image_code[index]
        for _ in range(NEGATIVE_TRIES):
            other = randint(g, len(self))
            if self._image_code[other] != mine:
                return other
        others = np.flatnonzero(self._image_code != mine)  # one image holds most captions: draw from the rest
        return int(others[randint(g, len(others))])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key, len(self))
        cfg, g = self.config, item_generator(self.seed, epoch, index)
        negative = bool(torch.rand((), generator=g) < cfg.negative_prob)
        source = self._negative(index, g) if negative else index
        text = encode_text(self.tokenizer, self.caption(source), cfg.max_text_length)
        maskable = text["attention_mask"].bool() & ~text["special_tokens_mask"]
        supervised = not negative or cfg.masked_pairs == "all"
        input_ids, lm_labels = mask_tokens(
            text["input_ids"][None],
            maskable[None],
            self.tokenizer.mask_token_id,
            len(self.tokenizer),
            g,
            probability=cfg.word_mask_prob,
        )
        regions = self.regions[self.image_id(index)]
        features, region_labels = mask_regions(
            regions.features[None],
            regions.region_mask[None],
            g,
            probability=cfg.region_mask_prob,
            zero_probability=cfg.region_zero_prob,
        )
        targets = regions.features if self.objective == "regression" else regions.class_probs
        if not supervised:  # masked all the same, or the alignment head could tell a negative by its missing masks
            lm_labels, region_labels = torch.full_like(lm_labels, IGNORE), torch.full_like(region_labels, IGNORE)
        return {
            "input_ids": input_ids[0],
            "token_type_ids": text["token_type_ids"],
            "attention_mask": text["attention_mask"],
            "masked_lm_labels": lm_labels[0],
            "features": features[0],
            "boxes": regions.boxes,
            "region_mask": regions.region_mask,
            "region_labels": region_labels[0],
            "region_targets": targets,
            "alignment_labels": torch.tensor(int(negative)),
            "meta": {
                "caption_id": self.caption_id(index),
                "image_id": self.image_id(index),
                "caption_image_id": self.image_id(source),
                "index": index,
            },
        }
