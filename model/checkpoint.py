"""Checkpoints: the native directory format, official ViLBERT files, and BERT text-stream initialisation.

Native checkpoint directory::

    config.json           {"format": "vilbert-native/1", "kind": "pretraining"|"tasks", "num_answers": ...,
                           "model": <ViLBertConfig>}
    model.safetensors     the state dict (tied weights stored once)
    tokenizer files       tokenizer.json, vocab.txt, ... (when a tokenizer is given)
    feature_spec.json     the region-feature spec the model was trained on (when known)

Nothing here unpickles untrusted data: safetensors, or ``torch.load(weights_only=True)`` for foreign
``.bin`` / ``.pth`` files.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ViLBertConfig
from .convert import CheckpointMismatch, LoadReport, load_official_state_dict
from .heads import ViLBertForPretraining, ViLBertForTasks, ViLBertModule

FORMAT = "vilbert-native/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FEATURE_SPEC_FILE = "feature_spec.json"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or, safely, from a torch ``.bin`` / ``.pth`` / ``.pt`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors carry little context; say what we tried
        raise CheckpointMismatch(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{path} does not hold a flat state dict of tensors")
    return state


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(
    model: ViLBertModule,
    folder: str | Path,
    tokenizer=None,
    feature_spec: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a native checkpoint directory (files replaced atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "kind": "tasks" if isinstance(model, ViLBertForTasks) else "pretraining",
        "model": model.config.to_dict(),
    }
    if isinstance(model, ViLBertForTasks):
        header["num_answers"] = model.answer.out.bias.shape[0]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata=dict(metadata or {})))
    _atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(header, indent=2) + "\n"))
    if feature_spec is not None:
        _atomic_write(
            folder / FEATURE_SPEC_FILE,
            lambda tmp: Path(tmp).write_text(json.dumps(dict(feature_spec), indent=2) + "\n"),
        )
    if tokenizer is not None:  # the tokenizer's owner is transformers: imported only when needed (slow import)
        from .tokenizer import save_tokenizer

        save_tokenizer(tokenizer, folder)
    return folder


def read_header(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a checkpoint directory: {CONFIG_FILE} is missing")
    header = json.loads(path.read_text())
    if header.get("format") != FORMAT:
        raise CheckpointMismatch(
            f"{path} is not a native ViLBERT checkpoint (format {header.get('format')!r}, "
            f"expected {FORMAT!r}); official checkpoints load with load_official()"
        )
    return header


def load_checkpoint(
    folder: str | Path, kind: str | None = None, num_answers: int | None = None, strict: bool = True
) -> ViLBertModule:
    """Load a native checkpoint.  ``kind`` converts between model classes: a pretraining checkpoint
    loads into a ``"tasks"`` model (with ``num_answers``), whose task heads then start fresh."""
    header = read_header(folder)
    config = ViLBertConfig.from_dict(header["model"])
    kind = kind or header["kind"]
    if kind == "tasks":
        answers = num_answers or header.get("num_answers")
        if not answers:
            raise ValueError("a tasks model needs num_answers (the VQA answer vocabulary size)")
        model: ViLBertModule = ViLBertForTasks(config, num_answers=answers)
    elif kind == "pretraining":
        model = ViLBertForPretraining(config)
    else:
        raise ValueError(f"kind must be 'pretraining' or 'tasks', got {kind!r}")
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    if header["kind"] != kind:  # pretraining heads live under another name in the tasks model
        old, new = ("heads.", "pretraining.") if kind == "tasks" else ("pretraining.", "heads.")
        state = {new + k[len(old) :] if k.startswith(old) else k: v for k, v in state.items()}
        own = set(model.state_dict())
        state = {k: v for k, v in state.items() if k in own}
        strict = False
    result = model.load_state_dict(state, strict=strict)
    if not strict and header["kind"] == kind and (result.missing_keys or result.unexpected_keys):
        raise CheckpointMismatch(f"missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")
    return model


def read_feature_spec(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / FEATURE_SPEC_FILE
    return json.loads(path.read_text()) if path.exists() else None


def load_official(
    weights: str | Path,
    config: str | Path | ViLBertConfig,
    kind: str = "pretraining",
    num_answers: int | None = None,
    strict: bool = True,
) -> tuple[ViLBertModule, LoadReport]:
    """Build a model from an official ViLBERT checkpoint file and its config JSON.

    ``kind="tasks"`` builds the transfer model; ``num_answers`` defaults to the checkpoint's VQA head size.
    With ``strict`` a key or shape mismatch raises :class:`CheckpointMismatch` listing every difference.
    """
    cfg = config if isinstance(config, ViLBertConfig) else ViLBertConfig.from_json(config)
    state = read_state_dict(weights)
    if kind == "tasks":
        if num_answers is None:
            bias = state.get("vil_prediction.main.3.bias", state.get("module.vil_prediction.main.3.bias"))
            if bias is None:
                raise CheckpointMismatch("no beta VQA head (vil_prediction.main.3) in the checkpoint: pass num_answers")
            num_answers = bias.shape[0]
        model: ViLBertModule = ViLBertForTasks(cfg, num_answers=num_answers)
    else:
        model = ViLBertForPretraining(cfg)
    return model, load_official_state_dict(model, state, strict=strict)


# ---- text stream from a BERT checkpoint ------------------------------------------------------------
_BERT_CONFIG_CHECKS = {  # BERT config.json field -> (our text config field); the depth is checked apart
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
}
_BERT_IGNORED = (
    "bert.pooler.",
    "cls.seq_relationship.",
    "bert.embeddings.position_ids",
    "cls.predictions.decoder.bias",
)


def _bert_weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", "model.bin"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no BERT weights (model.safetensors or pytorch_model.bin) in {folder}")


def check_bert_config(folder: str | Path, config: ViLBertConfig) -> int:
    """Raise if the BERT checkpoint's architecture differs from the text-stream config; return its depth.

    The text stream may be SHALLOWER than the checkpoint (it then takes the checkpoint's first
    ``text.num_layers`` layers); every other field must be equal.
    """
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in BERT folder {folder}")
    bert = json.loads(path.read_text())
    depth = int(bert.get("num_hidden_layers", config.text.num_layers))
    diffs = [
        f"{theirs}={bert[theirs]} vs text.{ours}={getattr(config.text, ours)}"
        for theirs, ours in _BERT_CONFIG_CHECKS.items()
        if theirs in bert and bert[theirs] != getattr(config.text, ours)
    ]
    if config.text.num_layers > depth:
        diffs.append(f"num_hidden_layers={depth} < text.num_layers={config.text.num_layers}")
    if diffs:
        raise CheckpointMismatch(f"BERT checkpoint {folder} does not fit the text stream: " + "; ".join(diffs))
    return depth


def load_bert_text_stream(model: ViLBertModule, folder: str | Path) -> LoadReport:
    """Initialise the text stream (embeddings, every text layer, and the masked-language head when the
    checkpoint has one) from a BERT checkpoint directory: config.json + safetensors or bin.

    Every text-stream weight must be present (else :class:`CheckpointMismatch`); the BERT pooler and NSP
    head do not fit ViLBERT's heads and are reported as ignored.  A text stream with fewer layers than the
    checkpoint takes its first ``text.num_layers`` layers (the rest are reported as ignored): a cheaper
    stream that still starts from pretrained BERT weights.
    """
    folder = Path(folder)
    depth = check_bert_config(folder, model.config)
    kept_layers = model.config.text.num_layers
    raw = read_state_dict(_bert_weights_file(folder))
    state = {}
    for key, value in raw.items():  # BertModel saves "embeddings.*", BertForPreTraining "bert.embeddings.*"
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key
        state[key] = value
    dropped = tuple(f"bert.encoder.layer.{i}." for i in range(kept_layers, depth))
    ignored = [k for k in state if k.startswith(_BERT_IGNORED + dropped)]
    state = {k: v for k, v in state.items() if k not in ignored}
    heads = "pretraining" if isinstance(model, ViLBertForTasks) else "heads"
    prefixes: tuple[str, ...] = ("vilbert.text_embeddings.", "vilbert.encoder.text_layers.")
    if any(k.startswith("cls.predictions.") for k in state):
        prefixes += (f"{heads}.language.",)
    report = load_official_state_dict(model, state, strict=False, only_prefixes=prefixes)
    report.ignored = sorted(ignored)
    if report.missing or report.shape_errors or report.unexpected:
        raise CheckpointMismatch(f"BERT checkpoint {folder} does not cover the text stream:\n" + report.summary())
    return report


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
