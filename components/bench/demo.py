"""A real model demo: the ``demo`` preset with its text stream from the bundled MiniLM BERT, real captions
through the real tokenizer, a small synthetic image batch, and a few pretraining steps (forward, backward,
AdamW) printing the three proxy-task losses.  Runs in seconds on a laptop CPU, downloads nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.data.masking import mask_regions, mask_tokens
from model import ViLBertForPretraining, preset
from model.checkpoint import count_parameters, load_bert_text_stream
from model.embeddings import with_image_token
from model.tokenizer import load_tokenizer, minilm_dir

CAPTIONS = (
    "a red circle sits to the left of a large blue square",
    "two small green triangles above a yellow rectangle",
    "a purple star partly hidden behind an orange circle",
    "three blue squares in a row on a striped background",
)


@dataclass
class DemoResult:
    parameters: int
    bert_weights_loaded: int
    losses: list[dict[str, float]]


def synthetic_batch(tokenizer, config, captions=CAPTIONS, regions: int = 10, max_len: int = 24, seed: int = 0):
    """Tokenised captions, random region features with plausible boxes, masking, and alignment negatives."""
    g = torch.Generator().manual_seed(seed)
    b = len(captions)
    # Alignment: every other example gets another example's caption (label 1 = not matching).
    alignment = torch.tensor([i % 2 for i in range(b)])
    texts = [captions[(i + 1) % b] if alignment[i] else captions[i] for i in range(b)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    special = torch.tensor(
        [tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in enc["input_ids"].tolist()]
    ).bool()
    maskable = enc["attention_mask"].bool() & ~special
    input_ids, lm_labels = mask_tokens(enc["input_ids"], maskable, tokenizer.mask_token_id, config.text.vocab_size, g)
    d, c = config.vision.feature_size, config.vision.target_size
    features = torch.rand(b, regions, d, generator=g) * 2
    xy = torch.rand(b, regions, 2, generator=g) * 0.6
    wh = torch.rand(b, regions, 2, generator=g) * 0.35 + 0.05
    boxes = torch.cat([xy, xy + wh, (wh[..., :1] * wh[..., 1:])], -1)
    mask = torch.ones(b, regions, dtype=torch.long)
    mask[-1, regions // 2 :] = 0  # one image with fewer detected boxes
    features, boxes, mask = with_image_token(features, boxes, mask)
    targets = torch.softmax(torch.randn(b, regions + 1, c, generator=g) * 2, -1)
    features, region_labels = mask_regions(features, mask, g, probability=0.3)
    return {
        "input_ids": input_ids,
        "token_type_ids": enc["token_type_ids"],
        "attention_mask": enc["attention_mask"],
        "features": features,
        "boxes": boxes,
        "region_mask": mask,
        "masked_lm_labels": lm_labels,
        "region_labels": region_labels,
        "region_targets": targets,
        "alignment_labels": alignment,
    }


def run_demo(steps: int = 3, seed: int = 0, log=print) -> DemoResult:
    torch.manual_seed(seed)
    config = preset("demo")
    model = ViLBertForPretraining(config)
    report = load_bert_text_stream(model, minilm_dir())
    tokenizer = load_tokenizer(minilm_dir())
    log(
        f"demo model: {count_parameters(model) / 1e6:.1f}M parameters; text stream from MiniLM-L6 "
        f"({len(report.loaded)} tensors loaded, ignored: {', '.join(report.ignored) or 'none'})"
    )
    batch = synthetic_batch(tokenizer, config, seed=seed)
    log(
        f"batch: {batch['input_ids'].shape[0]} captions x {batch['input_ids'].shape[1]} tokens, "
        f"{batch['features'].shape[1]} regions; {int((batch['masked_lm_labels'] >= 0).sum())} masked words, "
        f"{int((batch['region_labels'] == 1).sum())} masked regions"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    history = []
    for step in range(1, steps + 1):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {
            "masked_lm": out.masked_lm_loss.item(),
            "masked_region": out.masked_region_loss.item(),
            "alignment": out.alignment_loss.item(),
        }
        history.append(row)
        log(
            f"step {step}: masked_lm {row['masked_lm']:.4f}  masked_region {row['masked_region']:.4f}  "
            f"alignment {row['alignment']:.4f}"
        )
    return DemoResult(count_parameters(model), len(report.loaded), history)
