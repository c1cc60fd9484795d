import json

import pytest

from model.config import PRESETS, CoAttentionConfig, ConfigError, TextConfig, ViLBertConfig, VisionConfig, preset

OFFICIAL_6LAYER_6CONECT = {  # the fields of config/bert_base_6layer_6conect.json in the original repository
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 2,
    "vocab_size": 30522,
    "v_feature_size": 2048,
    "v_target_size": 1601,
    "v_hidden_size": 1024,
    "v_num_hidden_layers": 6,
    "v_num_attention_heads": 8,
    "v_intermediate_size": 1024,
    "bi_hidden_size": 1024,
    "bi_num_attention_heads": 8,
    "bi_intermediate_size": 1024,
    "bi_attention_type": 1,
    "v_attention_probs_dropout_prob": 0.1,
    "v_hidden_act": "gelu",
    "v_hidden_dropout_prob": 0.1,
    "v_initializer_range": 0.02,
    "v_biattention_id": [0, 1, 2, 3, 4, 5],
    "t_biattention_id": [6, 7, 8, 9, 10, 11],
    "pooling_method": "mul",
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = preset(name)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert ViLBertConfig.from_json(path) == cfg


def test_paper_base_is_the_official_6layer_6conect_config(tmp_path):
    path = tmp_path / "bert_base_6layer_6conect.json"
    path.write_text(json.dumps(OFFICIAL_6LAYER_6CONECT))
    cfg = ViLBertConfig.from_json(path)
    assert cfg == preset("paper-base")
    assert cfg.fusion == "mul"  # the official json has no fusion_method; "pooling_method" is never read
    assert (cfg.vision.hidden_size, cfg.vision.num_heads, cfg.vision.num_layers) == (1024, 8, 6)
    assert (cfg.coattention.hidden_size, cfg.coattention.num_heads, cfg.coattention.num_blocks) == (1024, 8, 6)


def test_official_round_trip_keeps_every_used_field(reference_dir):
    for path in sorted(reference_dir.glob("*_config.json")):
        official = json.loads(path.read_text())
        cfg = ViLBertConfig.from_official(official)
        back = cfg.to_official()
        for key in (
            "hidden_size",
            "v_hidden_size",
            "bi_hidden_size",
            "v_biattention_id",
            "t_biattention_id",
            "fusion_method",
            "num_hidden_layers",
            "v_num_hidden_layers",
            "v_target_size",
        ):
            assert back[key] == official[key], key
        assert ViLBertConfig.from_official(back) == cfg


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TextConfig(hidden_size=30, num_heads=4), "not divisible"),
        (lambda: CoAttentionConfig(text_layers_before=(1, 2), vision_layers_before=(0,)), "one entry per block"),
        (lambda: CoAttentionConfig(text_layers_before=(3, 2), vision_layers_before=(0, 1)), "non-decreasing"),
        (
            lambda: ViLBertConfig(
                coattention=CoAttentionConfig(text_layers_before=(6, 13), vision_layers_before=(0, 1))
            ),
            "exceeds",
        ),
        (lambda: ViLBertConfig(fusion="concat"), "fusion"),
        (lambda: VisionConfig(location_size=4), "location_size"),
        (lambda: ViLBertConfig(region_objective="regression"), "target_size must equal"),
        (lambda: ViLBertConfig.from_official({"fast_mode": True}), "fast_mode"),
        (lambda: ViLBertConfig.from_dict({"text": {"hiden_size": 3}}), "unknown text config keys"),
        (lambda: preset("huge"), "unknown preset"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
