"""Adapter between the reference (official) ViLBERT state-dict format and this package's modules.

The official key names (jiasenlu/vilbert_beta and facebookresearch/vilbert-multi-task, which share the
trunk and pretraining-head names) are listed once, in :func:`official_key_map`.  The same table loads
the text stream from a plain BERT checkpoint, whose keys are the official text keys without the
visual parts.  Differences this adapter bridges:

* query / key / value projections are fused into one matrix here (``qkv``; ``key_value`` in co-attention);
* the masked-language decoder is tied to the word embeddings, so ``cls.predictions.decoder.weight`` is
  checked against the embeddings instead of being stored twice;
* ``biOutput.q_dense1/q_dense2`` exist in every official checkpoint but are never used by the reference
  forward pass: they are accepted, reported as unused, and kept so that an export restores them;
* old-style weight norm (``weight_g`` / ``weight_v``) maps onto ``parametrizations.weight.original0/1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import ViLBertConfig

if TYPE_CHECKING:
    from .heads import ViLBertModule

#: (native name suffix, [official name suffixes concatenated along dim 0]) for one TRM layer.
_TRM = [
    ("qkv", ["attention.self.query", "attention.self.key", "attention.self.value"]),
    ("attention_out.dense", ["attention.output.dense"]),
    ("attention_out.norm", ["attention.output.LayerNorm"]),
    ("ffn.up", ["intermediate.dense"]),
    ("ffn.down.dense", ["output.dense"]),
    ("ffn.down.norm", ["output.LayerNorm"]),
]
#: The same for one co-attention block (official "1" = visual stream, "2" = text stream).
_COTRM = [
    ("text_query", ["biattention.query2"]),
    ("vision_key_value", ["biattention.key1", "biattention.value1"]),
    ("vision_query", ["biattention.query1"]),
    ("text_key_value", ["biattention.key2", "biattention.value2"]),
    ("text_attention_out.dense", ["biOutput.dense2"]),
    ("text_attention_out.norm", ["biOutput.LayerNorm2"]),
    ("vision_attention_out.dense", ["biOutput.dense1"]),
    ("vision_attention_out.norm", ["biOutput.LayerNorm1"]),
    ("text_ffn.up", ["t_intermediate.dense"]),
    ("text_ffn.down.dense", ["t_output.dense"]),
    ("text_ffn.down.norm", ["t_output.LayerNorm"]),
    ("vision_ffn.up", ["v_intermediate.dense"]),
    ("vision_ffn.down.dense", ["v_output.dense"]),
    ("vision_ffn.down.norm", ["v_output.LayerNorm"]),
]
#: Official parameters the reference model holds but never reads, per co-attention block.
_COTRM_UNUSED = ["biOutput.q_dense1", "biOutput.q_dense2"]
TIED_DECODER = "cls.predictions.decoder.weight"


def _module_pairs(config: ViLBertConfig, heads_prefix: str, task_heads: bool) -> list[tuple[str, list[str]]]:
    """(native module path, [official module paths]) for every mapped module."""
    pairs: list[tuple[str, list[str]]] = [
        ("vilbert.text_embeddings.word", ["bert.embeddings.word_embeddings"]),
        ("vilbert.text_embeddings.position", ["bert.embeddings.position_embeddings"]),
        ("vilbert.text_embeddings.token_type", ["bert.embeddings.token_type_embeddings"]),
        ("vilbert.text_embeddings.norm", ["bert.embeddings.LayerNorm"]),
        ("vilbert.vision_embeddings.feature", ["bert.v_embeddings.image_embeddings"]),
        ("vilbert.vision_embeddings.location", ["bert.v_embeddings.image_location_embeddings"]),
        ("vilbert.vision_embeddings.norm", ["bert.v_embeddings.LayerNorm"]),
    ]
    for native, official, count, table in (
        ("vilbert.encoder.text_layers", "bert.encoder.layer", config.text.num_layers, _TRM),
        ("vilbert.encoder.vision_layers", "bert.encoder.v_layer", config.vision.num_layers, _TRM),
        ("vilbert.encoder.coattention_layers", "bert.encoder.c_layer", config.coattention.num_blocks, _COTRM),
    ):
        for i in range(count):
            pairs += [(f"{native}.{i}.{n}", [f"{official}.{i}.{o}" for o in os]) for n, os in table]
    pairs += [
        ("vilbert.text_pooler.dense", ["bert.t_pooler.dense"]),
        ("vilbert.vision_pooler.dense", ["bert.v_pooler.dense"]),
        (f"{heads_prefix}.language.transform.dense", ["cls.predictions.transform.dense"]),
        (f"{heads_prefix}.language.transform.norm", ["cls.predictions.transform.LayerNorm"]),
        (f"{heads_prefix}.alignment", ["cls.bi_seq_relationship"]),
        (f"{heads_prefix}.region.transform.dense", ["cls.imagePredictions.transform.dense"]),
        (f"{heads_prefix}.region.transform.norm", ["cls.imagePredictions.transform.LayerNorm"]),
        (f"{heads_prefix}.region.decoder", ["cls.imagePredictions.decoder"]),
    ]
    if task_heads:
        pairs += [("pair", ["vil_logit"]), ("region", ["vision_logit"]), ("token", ["linguisic_logit"])]
    return pairs


def official_key_map(model: ViLBertModule) -> dict[str, list[str]]:
    """native parameter name -> the official keys it is made of (concatenated along dim 0)."""
    from .heads import ViLBertForTasks

    task = isinstance(model, ViLBertForTasks)
    native_params = dict(model.state_dict())
    mapping: dict[str, list[str]] = {}
    for native, officials in _module_pairs(model.config, "pretraining" if task else "heads", task):
        for suffix in ("weight", "bias"):
            if f"{native}.{suffix}" in native_params:
                mapping[f"{native}.{suffix}"] = [f"{o}.{suffix}" for o in officials]
    mapping[f"{'pretraining' if task else 'heads'}.language.bias"] = ["cls.predictions.bias"]
    if task:
        for native, official in (("answer.hidden", "vil_prediction.main.0"), ("answer.out", "vil_prediction.main.3")):
            mapping[f"{native}.bias"] = [f"{official}.bias"]
            mapping[f"{native}.parametrizations.weight.original0"] = [f"{official}.weight_g"]
            mapping[f"{native}.parametrizations.weight.original1"] = [f"{official}.weight_v"]
    return mapping


def unused_official_keys(config: ViLBertConfig) -> list[str]:
    """Official keys that the reference model carries but never uses in its forward pass."""
    return [
        f"bert.encoder.c_layer.{i}.{name}.{s}"
        for i in range(config.coattention.num_blocks)
        for name in _COTRM_UNUSED
        for s in ("weight", "bias")
    ]


def normalize_official_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Undo the spellings older checkpoints use: ``module.`` (DataParallel), LayerNorm ``gamma``/``beta``,
    and the parametrizations spelling of weight norm."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        out[key] = value
    return out


class CheckpointMismatch(RuntimeError):
    """Keys or shapes of a checkpoint do not match the model (the message lists them)."""


@dataclass
class LoadReport:
    """What a load did with every key."""

    loaded: list[str] = field(default_factory=list)
    """Native parameters filled from the checkpoint."""
    missing: list[str] = field(default_factory=list)
    """Native parameters the checkpoint had nothing for (they keep their initial values)."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint keys this model has no place for."""
    unused: dict[str, Tensor] = field(default_factory=dict)
    """Known official parameters the reference never reads (kept for export)."""
    ignored: list[str] = field(default_factory=list)
    """Keys skipped on purpose (e.g. a BERT checkpoint's pooler and NSP head)."""
    shape_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_errors)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} parameters"]
        for title, items in (
            ("missing (not in checkpoint)", self.missing),
            ("unexpected (not in model)", self.unexpected),
            ("shape mismatch", self.shape_errors),
            ("unused by the reference model, kept for export", list(self.unused)),
            ("ignored", self.ignored),
        ):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  - {k}" for k in items[:40]]
                if len(items) > 40:
                    lines.append(f"  ... and {len(items) - 40} more")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def load_official_state_dict(
    model: ViLBertModule, state: Mapping[str, Tensor], strict: bool = True, only_prefixes: tuple[str, ...] | None = None
) -> LoadReport:
    """Copy an official state dict into ``model`` (a :class:`ViLBertForPretraining` or
    :class:`ViLBertForTasks`).  With ``strict`` any missing / unexpected key or shape mismatch raises
    :class:`CheckpointMismatch` listing them; otherwise the report says what happened.

    ``only_prefixes`` restricts the native parameters considered (used for partial loads such as a BERT
    text stream); native parameters outside it are neither loaded nor reported missing.
    """
    state = normalize_official_keys(state)
    report = LoadReport()
    mapping = official_key_map(model)
    if only_prefixes is not None:
        mapping = {k: v for k, v in mapping.items() if k.startswith(only_prefixes)}
    params = model.state_dict()
    consumed: set[str] = set()
    updates: dict[str, Tensor] = {}
    for native, officials in mapping.items():
        if not all(o in state for o in officials):
            report.missing.append(native)
            continue
        consumed.update(officials)
        value = torch.cat([state[o] for o in officials], 0) if len(officials) > 1 else state[officials[0]]
        if tuple(value.shape) != tuple(params[native].shape):
            report.shape_errors.append(
                f"{native}: checkpoint {tuple(value.shape)} "
                f"({' + '.join(officials)}) vs model {tuple(params[native].shape)}"
            )
            continue
        updates[native] = value
    if TIED_DECODER in state:
        consumed.add(TIED_DECODER)
        word = "vilbert.text_embeddings.word.weight"
        source = updates.get(word)
        if source is not None and not torch.equal(state[TIED_DECODER], source):
            report.notes.append(
                f"{TIED_DECODER} differs from the word embeddings; the model ties them and "
                "uses bert.embeddings.word_embeddings.weight"
            )
    for key in unused_official_keys(model.config):
        if key in state:
            consumed.add(key)
            report.unused[key] = state[key]
    report.unexpected = [k for k in state if k not in consumed]
    if strict and not report.ok:
        raise CheckpointMismatch("official checkpoint does not match the model:\n" + report.summary())
    with torch.no_grad():
        for native, value in updates.items():
            params[native].copy_(value.to(params[native].dtype))
    report.loaded = sorted(updates)
    return report


def export_official_state_dict(model: ViLBertModule, unused: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's parameters under official key names, loadable by the reference code (strict).

    The parameters the reference never reads (``q_dense1/2``) come from ``unused`` (what the loader kept)
    or, when absent, are drawn like the reference initialises them; they cannot change any output.
    """
    params = model.state_dict()
    out: dict[str, Tensor] = {}
    for native, officials in official_key_map(model).items():
        value = params[native]
        parts = value.chunk(len(officials), 0) if len(officials) > 1 else (value,)
        out.update({o: p.detach().clone().contiguous() for o, p in zip(officials, parts, strict=True)})
    out[TIED_DECODER] = params["vilbert.text_embeddings.word.weight"].detach().clone()
    unused = dict(unused or {})
    generator = torch.Generator().manual_seed(0)
    cfg = model.config
    for key in unused_official_keys(cfg):
        if key in unused:
            out[key] = unused[key].detach().clone()
            continue
        stream = cfg.vision if ".q_dense1." in key else cfg.text
        shape = (stream.hidden_size, cfg.coattention.hidden_size) if key.endswith("weight") else (stream.hidden_size,)
        out[key] = (
            torch.randn(shape, generator=generator) * cfg.initializer_range
            if key.endswith("weight")
            else torch.zeros(shape)
        )
    return out
