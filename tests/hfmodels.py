"""Tiny Hugging Face model folders for ``akidb-embed convert``: real transformers models with random weights.

A 2-layer BERT (hidden 32) saved as sentence-transformers saves a plain HF model (mean pooling by default), with
the tokenizer of tinymodels.py; converting it takes seconds. Needs torch and transformers (the convert extra).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import tinymodels


def save_tokenizer(tokenizer: object, folder: Path, **special: str) -> None:
    """A ``tokenizers`` tokenizer saved as transformers' fast tokenizer (tokenizer.json and its config)."""
    transformers = pytest.importorskip("transformers")

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=128, **special)
    fast.save_pretrained(folder)


def build_bert(folder: Path, damage: Callable[[object], None] | None = None) -> Path:
    """The tiny BERT's folder (fixed seed), ``damage`` applied to its weights first if given; skips the test
    without torch and transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    tokenizer = tinymodels.build_encoder_tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                     initializer_range=0.2)  # BERT's 0.02 makes every text nearly the same vector
    model = transformers.BertModel(config)
    if damage is not None:
        with torch.no_grad():
            damage(model)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                   mask_token="[MASK]")
    return folder
