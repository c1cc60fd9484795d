"""Numerical parity with the original ViLBERT, checked against test vectors made by the reference code.

A reference folder holds, per configuration X: ``X_config.json`` (official BertConfig fields),
``X_pretraining_state_dict.safetensors``, ``X_vltasks_state_dict.safetensors``, ``X_inputs.safetensors``,
``X_outputs.safetensors`` (float32) and optionally ``X_outputs_fp64.safetensors``.  The official
checkpoints are loaded through the official-checkpoint adapter and every reference output is compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from .config import ViLBertConfig
from .convert import export_official_state_dict, load_official_state_dict
from .heads import ViLBertForPretraining, ViLBertForTasks

ATOL = 1e-5
RTOL = 1e-5
FP64_ATOL = 1e-9
FP64_RTOL = 1e-9


@dataclass
class Comparison:
    name: str
    max_abs: float
    max_rel: float
    ok: bool
    dtype: str = "float32"


@dataclass
class ConfigParity:
    config: str
    comparisons: list[Comparison] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.ok for c in self.comparisons)


def compare(name: str, ours: Tensor, ref: Tensor, atol: float = ATOL, rtol: float = RTOL) -> Comparison:
    """allclose-style check, |ours - ref| <= atol + rtol * |ref|, with the worst differences."""
    ours = ours.detach().to(ref.dtype).reshape(ref.shape)
    diff = (ours - ref).abs()
    rel = diff / ref.abs().clamp_min(torch.finfo(ref.dtype).tiny)
    ok = bool(torch.all(diff <= atol + rtol * ref.abs())) and bool(torch.isfinite(ours).all())
    return Comparison(name, float(diff.max()), float(rel.max()), ok, str(ref.dtype).replace("torch.", ""))


def find_configs(reference_dir: str | Path) -> list[str]:
    """Names X of every ``X_config.json`` in the folder that has its state dicts, inputs and outputs."""
    root = Path(reference_dir)
    names = []
    for cfg in sorted(root.glob("*_config.json")):
        name = cfg.name[: -len("_config.json")]
        needed = [
            f"{name}_{part}.safetensors"
            for part in ("pretraining_state_dict", "vltasks_state_dict", "inputs", "outputs")
        ]
        if all((root / n).exists() for n in needed):
            names.append(name)
    return names


def _model_inputs(inputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {
        "input_ids": inputs["input_ids"],
        "features": inputs["image_feat"].to(dtype),
        "boxes": inputs["image_loc"].to(dtype),
        "token_type_ids": inputs["token_type_ids"],
        "attention_mask": inputs["attention_mask"],
        "region_mask": inputs["image_attention_mask"],
    }


def _pretraining_labels(inputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The reference aligns region labels/targets with regions 1..R-1; ours cover every region."""
    label, target = inputs["image_label"], inputs["image_target"].to(dtype)
    b, _, c = target.shape
    return {
        "masked_lm_labels": inputs["masked_lm_labels"],
        "region_labels": torch.cat([label.new_full((b, 1), -1), label], 1),
        "region_targets": torch.cat([target.new_zeros(b, 1, c), target], 1),
        "alignment_labels": inputs["next_sentence_label"],
    }


@torch.no_grad()
def run_models(name: str, root: Path, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Our outputs under the reference names, and the reference output tensors, for one config."""
    config = ViLBertConfig.from_json(root / f"{name}_config.json")
    inputs = load_file(str(root / f"{name}_inputs.safetensors"))
    suffix = "outputs" if dtype == torch.float32 else "outputs_fp64"
    reference = load_file(str(root / f"{name}_{suffix}.safetensors"))
    x = _model_inputs(inputs, dtype)

    pre = ViLBertForPretraining(config)
    load_official_state_dict(pre, load_file(str(root / f"{name}_pretraining_state_dict.safetensors")))
    pre = pre.to(dtype).eval()
    ours: dict[str, Tensor] = {}
    trunk = pre.vilbert(**x, output_block_states=True)
    ours["pretrain.bert.embedding_output_t"] = trunk.text_embeddings
    ours["pretrain.bert.embedding_output_v"] = trunk.vision_embeddings
    ours["pretrain.bert.sequence_output_t"] = trunk.text
    ours["pretrain.bert.sequence_output_v"] = trunk.vision
    ours["pretrain.bert.pooled_output_t"] = trunk.pooled_text
    ours["pretrain.bert.pooled_output_v"] = trunk.pooled_vision
    for k, (t, v) in enumerate(trunk.encoder.block_states or []):
        ours[f"pretrain.bert.coattn_block{k}_output_t"] = t
        ours[f"pretrain.bert.coattn_block{k}_output_v"] = v
    logits = pre(**x)
    ours["pretrain.prediction_scores_t"] = logits.text_logits
    ours["pretrain.prediction_scores_v"] = logits.region_logits
    ours["pretrain.seq_relationship_score"] = logits.alignment_logits
    loss = pre(**x, **_pretraining_labels(inputs, dtype))
    ours["pretrain.masked_lm_loss"] = loss.masked_lm_loss
    ours["pretrain.masked_img_loss"] = loss.masked_region_loss
    ours["pretrain.next_sentence_loss"] = loss.alignment_loss

    vl_state = load_file(str(root / f"{name}_vltasks_state_dict.safetensors"))
    num_answers = vl_state["vil_prediction.main.3.bias"].shape[0]
    tasks = ViLBertForTasks(config, num_answers=num_answers)
    load_official_state_dict(tasks, vl_state)
    out = tasks.to(dtype).eval()(**x)
    ours["vltasks.vil_prediction"] = out.answer_logits
    ours["vltasks.vil_logit"] = out.pair_logit
    ours["vltasks.vil_binary_prediction"] = out.alignment_logits
    ours["vltasks.vision_prediction"] = out.region_class_logits
    ours["vltasks.vision_logit"] = out.region_logits
    ours["vltasks.linguisic_prediction"] = out.token_class_logits
    ours["vltasks.linguisic_logit"] = out.token_logits
    return ours, reference


def check_config(name: str, reference_dir: str | Path) -> ConfigParity:
    """Compare every reference output of one config (float32, and float64 where the file exists), and
    check that the official state dicts survive load + export key for key, value for value."""
    root = Path(reference_dir)
    result = ConfigParity(name)
    runs = [(torch.float32, ATOL, RTOL)]
    if (root / f"{name}_outputs_fp64.safetensors").exists():
        runs.append((torch.float64, FP64_ATOL, FP64_RTOL))
    for dtype, atol, rtol in runs:
        ours, reference = run_models(name, root, dtype)
        for key, ref in reference.items():
            if key not in ours or ours[key] is None:
                result.errors.append(f"{key}: no matching output")
                continue
            result.comparisons.append(compare(key, ours[key], ref, atol, rtol))
    result.errors += round_trip_errors(name, root)
    return result


def round_trip_errors(name: str, root: Path) -> list[str]:
    """Load each official state dict and export it again: same keys, bit-identical values."""
    config = ViLBertConfig.from_json(root / f"{name}_config.json")
    errors = []
    for part in ("pretraining", "vltasks"):
        state = load_file(str(root / f"{name}_{part}_state_dict.safetensors"))
        model = (
            ViLBertForPretraining(config)
            if part == "pretraining"
            else ViLBertForTasks(config, num_answers=state["vil_prediction.main.3.bias"].shape[0])
        )
        report = load_official_state_dict(model, state)
        exported = export_official_state_dict(model, report.unused)
        if set(exported) != set(state):
            errors.append(
                f"{part} round trip: keys differ: only exported {sorted(set(exported) - set(state))[:5]}, "
                f"only original {sorted(set(state) - set(exported))[:5]}"
            )
            continue
        changed = [k for k in state if not torch.equal(exported[k], state[k])]
        if changed:
            errors.append(f"{part} round trip: values differ for {changed[:5]}")
    return errors


def check_reference_dir(reference_dir: str | Path) -> list[ConfigParity]:
    names = find_configs(reference_dir)
    if not names:
        raise FileNotFoundError(
            f"no complete reference configs (X_config.json + state dicts, inputs, outputs) in {reference_dir}"
        )
    return [check_config(name, reference_dir) for name in names]
