"""Behaviour of the network on the tiny preset: shapes, masking, determinism, gradients, bad input."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import InputError, ViLBertForPretraining, ViLBertForTasks, preset
from model.embeddings import normalized_boxes, with_image_token
from model.layers import attend
from tests.conftest import make_batch, make_labels

CFG = preset("tiny")


@pytest.fixture
def pretraining():
    torch.manual_seed(0)
    return ViLBertForPretraining(CFG).eval()


@pytest.fixture
def tasks():
    torch.manual_seed(0)
    return ViLBertForTasks(CFG, num_answers=7).eval()


def test_output_shapes(pretraining, tasks):
    x = make_batch(CFG, batch=3, tokens=9, regions=6)
    out = pretraining(**x)
    assert out.text_logits.shape == (3, 9, CFG.text.vocab_size)
    assert out.region_logits.shape == (3, 6, CFG.vision.target_size)
    assert out.alignment_logits.shape == (3, 2)
    assert out.trunk.pooled_text.shape == out.trunk.pooled_vision.shape == (3, CFG.coattention.hidden_size)
    t = tasks(**x)
    assert t.answer_logits.shape == (3, 7) and t.pair_logit.shape == (3, 1)
    assert t.region_logits.shape == (3, 6, 1) and t.token_logits.shape == (3, 9, 1)
    assert t.alignment_logits.shape == (3, 2)
    only = tasks(**x, heads=("answer",))
    assert only.region_logits is None and torch.allclose(only.answer_logits, t.answer_logits)


def test_padding_never_changes_real_tokens_or_regions(pretraining):
    x = make_batch(CFG, batch=2, tokens=7, regions=5)
    x["attention_mask"][:] = 1
    x["region_mask"][:] = 1
    base = pretraining.vilbert(**x)
    padded = {k: v.clone() for k, v in x.items()}
    extra_tokens, extra_regions = 4, 3
    padded["input_ids"] = torch.cat([x["input_ids"], torch.randint(1, 50, (2, extra_tokens))], 1)
    padded["token_type_ids"] = torch.cat([x["token_type_ids"], torch.zeros(2, extra_tokens, dtype=torch.long)], 1)
    padded["attention_mask"] = torch.cat([x["attention_mask"], torch.zeros(2, extra_tokens, dtype=torch.long)], 1)
    padded["features"] = torch.cat([x["features"], torch.rand(2, extra_regions, CFG.vision.feature_size) * 5], 1)
    padded["boxes"] = torch.cat([x["boxes"], torch.rand(2, extra_regions, 5)], 1)
    padded["region_mask"] = torch.cat([x["region_mask"], torch.zeros(2, extra_regions, dtype=torch.long)], 1)
    out = pretraining.vilbert(**padded)
    torch.testing.assert_close(out.text[:, :7], base.text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.vision[:, :5], base.vision, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.pooled_text, base.pooled_text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.pooled_vision, base.pooled_vision, atol=1e-6, rtol=1e-5)


def test_deterministic_under_a_seed():
    x = make_batch(CFG)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = ViLBertForPretraining(CFG).train()  # dropout on: also seeded
        outs.append(model(**x, **make_labels(CFG, x)).loss)
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    assert not torch.equal(ViLBertForPretraining(CFG).train()(**x, **make_labels(CFG, x)).loss, outs[0])


def test_gradients_reach_both_streams_and_every_coattention_block(pretraining):
    pretraining.train()
    x = make_batch(CFG)
    pretraining(**x, **make_labels(CFG, x)).loss.backward()
    enc = pretraining.vilbert.encoder
    for name, module in [
        ("text embeddings", pretraining.vilbert.text_embeddings),
        ("vision embeddings", pretraining.vilbert.vision_embeddings),
        *[(f"text layer {i}", m) for i, m in enumerate(enc.text_layers)],
        *[(f"vision layer {i}", m) for i, m in enumerate(enc.vision_layers)],
        *[(f"co-attention {i}", m) for i, m in enumerate(enc.coattention_layers)],
    ]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_frozen_layers_get_no_gradient():
    cfg = CFG.replace(text=dataclasses.replace(CFG.text, frozen_layers=1))
    model = ViLBertForPretraining(cfg).train()
    x = make_batch(cfg)
    model(**x, **make_labels(cfg, x)).loss.backward()
    assert all(p.grad is None for p in model.vilbert.encoder.text_layers[0].parameters())
    assert all(p.grad is not None for p in model.vilbert.encoder.text_layers[1].parameters())


def test_masked_position_logits_give_the_full_vocabulary_loss(pretraining):
    x = make_batch(CFG)
    labels = make_labels(CFG, x)
    out = pretraining(**x, **labels)
    full = pretraining(**x)
    reference = F.cross_entropy(
        full.text_logits.reshape(-1, CFG.text.vocab_size), labels["masked_lm_labels"].reshape(-1), ignore_index=-1
    )
    torch.testing.assert_close(out.masked_lm_loss, reference)
    assert out.text_logits is None  # not computed at every position when labels are given


def test_losses_are_never_nan_without_supervised_items(pretraining):
    x = make_batch(CFG)
    labels = make_labels(CFG, x)
    labels["region_labels"][:] = -1
    labels["masked_lm_labels"][:] = -1
    labels["alignment_labels"][:] = -1
    out = pretraining(**x, **labels)
    for loss in (out.masked_lm_loss, out.masked_region_loss, out.alignment_loss):
        assert torch.isfinite(loss) and loss.item() == 0.0


def test_explicit_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, generator=g) for n in (5, 7, 7))
    bias = torch.zeros(2, 1, 1, 7)
    bias[1, ..., 5:] = -10000.0
    fast, _ = attend(q, k, v, bias, num_heads=2, dropout=0.0)
    slow, probs = attend(q, k, v, bias, num_heads=2, dropout=0.0, return_probs=True)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    assert probs.shape == (2, 2, 5, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))
    assert float(probs[1, ..., 5:].max()) == 0.0


def test_coattention_maps_are_returned_on_request(pretraining):
    out = pretraining.vilbert(**make_batch(CFG, batch=2, tokens=9, regions=6), output_attentions=True)
    maps = out.encoder.coattention_probs
    assert len(maps) == CFG.coattention.num_blocks
    t2v, v2t = maps[0]
    assert t2v.shape == (2, CFG.coattention.num_heads, 9, 6) and v2t.shape == (2, CFG.coattention.num_heads, 6, 9)


def test_image_token_and_box_helpers():
    feats = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    boxes = torch.rand(1, 3, 5)
    mask = torch.tensor([[1, 1, 0]])
    f, b, m = with_image_token(feats, boxes, mask)
    assert torch.equal(f[0, 0], torch.tensor([2.0, 3.0]))  # mean of the real regions only
    assert torch.equal(b[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    assert m.tolist() == [[1, 1, 1, 0]]
    loc = normalized_boxes(torch.tensor([[10.0, 20.0, 60.0, 70.0]]), width=100, height=200)
    torch.testing.assert_close(loc, torch.tensor([[0.1, 0.1, 0.6, 0.35, 50 * 50 / 20000]]))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda x: x.update(features=torch.rand(3, 6, CFG.vision.feature_size + 1)), "feature dimension"),
        (lambda x: x.update(boxes=torch.rand(3, 5, 5)), "boxes must have shape"),
        (lambda x: x.update(region_mask=torch.ones(3, 4, dtype=torch.long)), "region_mask must have shape"),
        (lambda x: x.update(attention_mask=torch.ones(3, 4, dtype=torch.long)), "attention_mask must have shape"),
        (lambda x: x["boxes"].__setitem__((0, 2, 2), 1.7), r"normalised to \[0, 1\]"),
        (lambda x: x["features"].__setitem__((1, 1, 0), float("nan")), "NaN"),
        (lambda x: x["input_ids"].__setitem__((0, 3), CFG.text.vocab_size), "outside the vocabulary"),
        (lambda x: x["input_ids"].__setitem__((0, 3), -2), "outside the vocabulary"),
        (lambda x: x.update(input_ids=x["input_ids"][:2]), "batch size mismatch"),
        (lambda x: x.update(input_ids=x["input_ids"].float()), "integer"),
        (lambda x: x["region_mask"].__setitem__((0, 0), 0), "region 0"),
    ],
)
def test_bad_input_raises_a_clear_error(pretraining, corrupt, message):
    x = make_batch(CFG)
    corrupt(x)
    with pytest.raises(InputError, match=message):
        pretraining(**x)


def test_bad_labels_raise_a_clear_error(pretraining):
    x = make_batch(CFG)
    labels = make_labels(CFG, x)
    labels["region_targets"] = labels["region_targets"][:, 1:]
    with pytest.raises(InputError, match="aligned with the 6 input regions"):
        pretraining(**x, **labels)


def test_skipping_padding_changes_nothing_at_real_positions_nor_the_gradients():
    torch.manual_seed(0)
    model = ViLBertForPretraining(CFG).eval()  # eval: no dropout, so both paths see the same computation
    x = make_batch(CFG, batch=3, tokens=9, regions=6)
    labels = make_labels(CFG, x)
    results = {}
    for mode in ("never", "always"):
        model.vilbert.skip_padding = mode
        model.zero_grad()
        out = model(**x, **labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        trunk = model.vilbert(**x, output_block_states=True)
        results[mode] = (out, grads, trunk)
    (a, ga, ta), (b, gb, tb) = results["never"], results["always"]
    for name in ("masked_lm_loss", "masked_region_loss", "alignment_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-4, msg=n)
    real_t, real_v = x["attention_mask"].bool(), x["region_mask"].bool()
    torch.testing.assert_close(ta.text[real_t], tb.text[real_t], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ta.vision[real_v], tb.vision[real_v], atol=1e-6, rtol=1e-5)
    for (at, av), (bt, bv) in zip(ta.encoder.block_states, tb.encoder.block_states, strict=True):
        torch.testing.assert_close(at[real_t], bt[real_t], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(av[real_v], bv[real_v], atol=1e-6, rtol=1e-5)
    assert float(tb.text[~real_t].abs().max()) == 0.0  # skipped positions are not computed
    model.vilbert.skip_padding = "sometimes"
    with pytest.raises(ValueError, match="skip_padding"):
        model(**x)
