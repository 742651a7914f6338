"""Tokenization with HF ``tokenizers``: truncation at the manifest's max_length, padding in numpy.

Texts are encoded without padding so the batcher can sort them by length and pad each
inference batch only to its own longest row. Only the token ids are kept, as numpy arrays:
an HF ``Encoding`` also holds token strings, offsets and the cut-off overflow (measured: 23 MiB
for 256 texts of 2,000 characters, against under 1 MiB of ids), so texts are encoded a chunk
at a time and their encodings dropped at once.

BPE tokenizers run without their word cache. In tokenizers 0.23 that cache lives in each thread
that encodes (the rayon pool's included), keyed by the tokenizer (huggingface/tokenizers#2028),
and is not freed with the tokenizer: each load of a BPE model left the words it cached behind in
threads that live on (measured: 24 KiB per load of the tiny Qwen3-style test model after 20
requests, and up to 10,000 words per thread with real text; the soak's daemon grew 16 % in 10
minutes). What it costs: a 30,000-token byte-level BPE (trained on Python sources) encoded 256
texts of 200 words in 83 ms without the cache, 59 to 79 ms with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models

from .filesize import MAX_TOKENIZER_BYTES, read_bounded

ENCODE_CHUNK = 32  # texts whose full HF encodings exist at one time


@dataclass(frozen=True)
class Tokens:
    """One text's token ids after truncation, and whether truncation cut anything."""

    ids: np.ndarray
    truncated: bool


@dataclass(frozen=True)
class Padded:
    """One inference batch: token ids and attention mask, [rows, longest]."""

    ids: np.ndarray
    mask: np.ndarray


class TextEncoder:
    """A tokenizer bound to one model's max_length and padding side."""

    def __init__(self, tokenizer_path: Path, max_length: int, padding_side: str) -> None:
        # Read here, bounded, rather than by Tokenizer.from_file: an absurd file is refused, not loaded into memory.
        self.tokenizer = Tokenizer.from_buffer(read_bounded(tokenizer_path, MAX_TOKENIZER_BYTES, "tokenizer.json"))
        _drop_word_cache(self.tokenizer)
        self.pad_id = _pad_id(self.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.padding_side = padding_side

    def encode(self, texts: list[str]) -> list[Tokens]:
        """Truncated, unpadded token ids of each text."""
        tokens = []
        for start in range(0, len(texts), ENCODE_CHUNK):
            encodings = self.tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK])
            tokens += [Tokens(np.array(e.ids, dtype=np.int64), bool(e.overflowing)) for e in encodings]
        return tokens

    def pad(self, texts: list[Tokens]) -> Padded:
        """Pad a batch to its longest row on the model's padding side."""
        longest = max(len(t.ids) for t in texts)
        ids = np.full((len(texts), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), longest), dtype=np.int64)
        for row, text in enumerate(texts):
            n = len(text.ids)
            span = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            ids[row, span] = text.ids
            mask[row, span] = 1
        return Padded(ids, mask)


def _drop_word_cache(tokenizer: Tokenizer) -> None:
    """Turn off a BPE model's word cache (see the module docstring); older tokenizers have no switch, but keep
    the cache in the model, which frees it."""
    model = tokenizer.model
    if isinstance(model, models.BPE) and hasattr(model, "_resize_cache"):
        model._resize_cache(0)


def _pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's own padding id if it declares one, else a common pad/eos token, else 0."""
    padding = tokenizer.padding
    if padding:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0
