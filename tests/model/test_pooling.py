"""The pooling options: what a caption summary is, and why the demo preset does not pool [CLS]."""

import pytest
import torch

from model import ViLBertForPretraining, preset
from model.checkpoint import load_bert_text_stream
from model.config import REFERENCE_POOLING, ConfigError
from model.tokenizer import load_tokenizer, minilm_dir
from tests.conftest import make_batch

CAPTIONS = [
    "a small red circle to the left of a blue square",
    "a large green star above a black hexagon",
    "close-up of a yellow triangle",
    "a purple diamond, a white cross and an orange circle",
]


def _trunk_inputs(batch: dict) -> dict:
    keys = ("input_ids", "features", "boxes", "token_type_ids", "attention_mask", "region_mask")
    return {k: batch[k] for k in keys}


def test_mean_pooling_ignores_padding_and_cls_pooling_takes_the_first_token():
    torch.manual_seed(0)
    model = ViLBertForPretraining(preset("tiny").replace(text_pooling="mean")).eval()
    batch = make_batch(model.config, batch=2, tokens=9)
    batch["attention_mask"][:, 6:] = 0
    with torch.no_grad():
        out = model.vilbert(**_trunk_inputs(batch))
        text = out.text
        real = batch["attention_mask"].unsqueeze(-1).float()
        mean = (text * real).sum(1) / real.sum(1)
        expected = torch.relu(model.vilbert.text_pooler.dense(mean))
        assert torch.allclose(out.pooled_text, expected, atol=1e-6)
        assert not torch.allclose(out.pooled_text, torch.relu(model.vilbert.text_pooler.dense(text[:, 0])))
        # padding contributes nothing: other ids at padded positions leave the summary as it is
        other = dict(batch, input_ids=batch["input_ids"].clone())
        other["input_ids"][:, 6:] = 1
        assert torch.allclose(model.vilbert(**_trunk_inputs(other)).pooled_text, out.pooled_text, atol=1e-5)


def test_tanh_pooler_and_fan_in_init_change_only_the_poolers_and_alignment_head():
    base = preset("tiny")
    torch.manual_seed(0)
    ref = ViLBertForPretraining(base)
    torch.manual_seed(0)
    new = ViLBertForPretraining(base.replace(pooler_activation="tanh", pooler_init="fan_in"))
    changed = {n for n, p in new.state_dict().items() if not torch.equal(p, ref.state_dict()[n])}
    assert changed == {
        f"{m}.{w}"
        for m in ("vilbert.text_pooler.dense", "vilbert.vision_pooler.dense", "heads.alignment")
        for w in ("weight", "bias")
    }
    assert new.heads.alignment.bias.abs().sum() > 0 and ref.heads.alignment.bias.abs().sum() == 0
    batch = make_batch(base, batch=2)
    with torch.no_grad():
        pooled = new.eval().vilbert(**_trunk_inputs(batch)).pooled_vision
    assert pooled.min() < 0  # tanh, not ReLU


def test_the_reference_format_refuses_what_it_cannot_express():
    cfg = preset("demo")
    assert {k: getattr(cfg, k) for k in REFERENCE_POOLING} != REFERENCE_POOLING
    with pytest.raises(ConfigError, match="reference cannot express"):
        cfg.to_official()
    official = cfg.reference_pooling().to_official()
    assert official["hidden_size"] == cfg.text.hidden_size
    for name in ("tiny", "paper-base"):
        preset(name).to_official()  # the reference's own choices


def test_cls_is_constant_across_captions_in_a_minilm_stream_and_the_mean_is_not():
    """The bug behind the flat alignment loss: all-MiniLM-L6-v2 is trained for mean pooling and keeps [CLS]
    (an attention sink) nearly the same for every caption below its output layer, so a stream cut from it
    gives every caption of one image almost the same [CLS] summary: the alignment head sees the image alone."""
    tokenizer = load_tokenizer(minilm_dir())
    enc = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    spread = {}
    for pooling in ("cls", "mean"):
        cfg = preset("demo").replace(text_pooling=pooling)
        assert cfg.text.num_layers < 6  # a stream cut from MiniLM-L6: [CLS] varies only at layer 6
        torch.manual_seed(0)
        model = ViLBertForPretraining(cfg).eval()
        load_bert_text_stream(model, minilm_dir())
        image = make_batch(cfg, batch=1)
        n = len(CAPTIONS)
        with torch.no_grad():
            out = model.vilbert(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                token_type_ids=torch.zeros_like(enc["input_ids"]),
                features=image["features"].expand(n, -1, -1),
                boxes=image["boxes"].expand(n, -1, -1),
                region_mask=image["region_mask"].expand(n, -1),
            )
        real = enc["attention_mask"].unsqueeze(-1).float()
        summary = out.text[:, 0] if pooling == "cls" else (out.text * real).sum(1) / real.sum(1)
        spread[pooling] = float(summary.std(0).mean() / summary.norm(dim=-1).mean())
    assert spread["mean"] > 5 * spread["cls"], spread
