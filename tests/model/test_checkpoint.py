"""Native checkpoints, official files, BERT text-stream initialisation."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model import ViLBertConfig, ViLBertForPretraining, ViLBertForTasks, preset
from model.checkpoint import (
    load_bert_text_stream,
    load_checkpoint,
    load_official,
    read_feature_spec,
    read_state_dict,
    save_checkpoint,
)
from model.convert import CheckpointMismatch, export_official_state_dict
from model.layers import StreamMask
from model.parity import find_configs
from model.tokenizer import load_tokenizer, minilm_dir
from tests.conftest import REFERENCE_DIR, make_batch

CFG = preset("tiny")


def test_native_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = ViLBertForTasks(CFG, num_answers=5).eval()
    spec = {"backend": "synthetic", "feature_size": CFG.vision.feature_size}
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=load_tokenizer(), feature_spec=spec)
    assert {"config.json", "model.safetensors", "feature_spec.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()
    }
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    loaded = load_checkpoint(tmp_path / "ckpt").eval()
    assert isinstance(loaded, ViLBertForTasks) and loaded.config == CFG
    x = make_batch(CFG)
    a, b = model(**x), loaded(**x)
    for field in ("answer_logits", "pair_logit", "region_logits", "alignment_logits", "token_class_logits"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert read_feature_spec(tmp_path / "ckpt") == spec
    assert load_tokenizer(tmp_path / "ckpt").vocab_size == 30522


def test_tied_decoder_is_stored_once_and_stays_tied(tmp_path):
    model = ViLBertForPretraining(CFG)
    save_checkpoint(model, tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert not any("decoder.weight" in k and "language" in k for k in keys)
    loaded = load_checkpoint(tmp_path)
    assert loaded.heads.language.word_embeddings[0].weight is loaded.vilbert.text_embeddings.word.weight


def test_pretraining_checkpoint_starts_a_tasks_model(tmp_path):
    torch.manual_seed(0)
    pre = ViLBertForPretraining(CFG).eval()
    save_checkpoint(pre, tmp_path)
    tasks = load_checkpoint(tmp_path, kind="tasks", num_answers=4).eval()
    x = make_batch(CFG)
    assert torch.equal(tasks(**x).alignment_logits, pre(**x).alignment_logits)
    assert torch.equal(tasks.vilbert.text_embeddings.word.weight, pre.vilbert.text_embeddings.word.weight)


def test_loading_a_non_checkpoint_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 3}')
    with pytest.raises(CheckpointMismatch, match="not a native ViLBERT checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", find_configs(REFERENCE_DIR))
def test_official_bin_file_loads_with_weights_only(name, tmp_path, reference_dir):
    state = load_file(str(reference_dir / f"{name}_vltasks_state_dict.safetensors"))
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "pytorch_model.bin")  # DataParallel style
    model, report = load_official(tmp_path / "pytorch_model.bin", reference_dir / f"{name}_config.json", kind="tasks")
    assert report.ok and isinstance(model, ViLBertForTasks)
    exported = export_official_state_dict(model, report.unused)
    assert set(exported) == set(state) and all(torch.equal(exported[k], state[k]) for k in state)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"weights": torch.zeros(2), "config": ViLBertConfig}, path)
    with pytest.raises(CheckpointMismatch, match="weights-only"):
        read_state_dict(path)


def test_minilm_initialises_every_text_weight_and_matches_bert():
    from transformers import BertModel

    torch.manual_seed(0)
    demo = preset("demo")  # two text layers: here the whole six-layer MiniLM
    model = ViLBertForPretraining(demo.replace(text=dataclasses.replace(demo.text, num_layers=6))).eval()
    report = load_bert_text_stream(model, minilm_dir())
    text_params = [
        k for k in model.state_dict() if k.startswith(("vilbert.text_embeddings.", "vilbert.encoder.text_layers."))
    ]
    assert len(report.loaded) == len(text_params) and set(report.loaded) == set(text_params)
    assert "bert.pooler.dense.weight" in report.ignored
    # Running our text embeddings + text layers alone reproduces the BERT checkpoint's hidden states.
    bert = BertModel.from_pretrained(str(minilm_dir()), local_files_only=True, attn_implementation="eager").eval()
    tok = load_tokenizer()
    enc = tok(["a red circle left of a blue square", "two triangles"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bert(**enc).last_hidden_state
        ours = model.vilbert.text_embeddings(enc["input_ids"], enc["token_type_ids"])
        mask = StreamMask.build(enc["attention_mask"], torch.float32, skip_padding=False)
        for layer in model.vilbert.encoder.text_layers:
            ours, _ = layer(ours, mask)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)


def test_a_shallower_text_stream_takes_the_first_bert_layers():
    from transformers import BertModel

    demo = preset("demo")
    shallow = demo.replace(
        text=dataclasses.replace(demo.text, num_layers=2),
        coattention=dataclasses.replace(demo.coattention, text_layers_before=(1, 2)),
    )
    model = ViLBertForPretraining(shallow).eval()
    report = load_bert_text_stream(model, minilm_dir())
    assert "vilbert.encoder.text_layers.1.ffn.down.dense.weight" in report.loaded
    assert "bert.encoder.layer.2.output.dense.weight" in report.ignored  # layers 2-5 are left out, and say so
    bert = BertModel.from_pretrained(str(minilm_dir()), local_files_only=True, attn_implementation="eager").eval()
    enc = load_tokenizer()(["a small red star"], return_tensors="pt")
    with torch.no_grad():
        expected = bert(**enc, output_hidden_states=True).hidden_states[2]  # after BERT's second layer
        ours = model.vilbert.text_embeddings(enc["input_ids"], enc["token_type_ids"])
        mask = StreamMask.build(enc["attention_mask"], torch.float32, skip_padding=False)
        for layer in model.vilbert.encoder.text_layers:
            ours, _ = layer(ours, mask)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    deeper = demo.replace(text=dataclasses.replace(demo.text, num_layers=8))
    with pytest.raises(CheckpointMismatch, match="num_hidden_layers=6 < text.num_layers=8"):
        load_bert_text_stream(ViLBertForPretraining(deeper), minilm_dir())


def test_bert_with_the_wrong_shape_is_refused():
    with pytest.raises(CheckpointMismatch, match="hidden_size=384 vs text.hidden_size=32"):
        load_bert_text_stream(ViLBertForPretraining(CFG), minilm_dir())


@pytest.mark.slow
def test_convert_and_export_commands_round_trip(tmp_path, reference_dir):
    name = find_configs(reference_dir)[0]
    weights = reference_dir / f"{name}_pretraining_state_dict.safetensors"
    config = reference_dir / f"{name}_config.json"
    cli = [sys.executable, "-m", "components.cli", "model"]
    done = subprocess.run(
        [*cli, "convert", str(weights), str(config), str(tmp_path / "native")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [*cli, "export-official", str(tmp_path / "native"), str(tmp_path / "official")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    exported = read_state_dict(tmp_path / "official" / "pytorch_model.bin")
    original = load_file(str(weights))
    assert set(exported) == set(original)
    used = [k for k in original if ".q_dense" not in k]  # never-read params are re-drawn without the loader's copy
    assert all(torch.equal(exported[k], original[k]) for k in used)
    model, report = load_official(tmp_path / "official" / "pytorch_model.bin", tmp_path / "official" / "config.json")
    assert report.ok
