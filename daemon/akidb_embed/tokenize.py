"""Tokenization with HF ``tokenizers``: truncation at the manifest's max_length, padding in numpy.

Texts are encoded without padding so the batcher can sort them by length and pad each
inference batch only to its own longest row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer


@dataclass(frozen=True)
class Padded:
    """One inference batch: token ids and attention mask, [rows, longest]."""

    ids: np.ndarray
    mask: np.ndarray


class TextEncoder:
    """A tokenizer bound to one model's max_length and padding side."""

    def __init__(self, tokenizer_path: Path, max_length: int, padding_side: str) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.pad_id = _pad_id(self.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.padding_side = padding_side

    def encode(self, texts: list[str]) -> list[Encoding]:
        """Truncated, unpadded encodings; ``overflowing`` is non-empty for cut inputs."""
        return self.tokenizer.encode_batch(texts)

    def pad(self, encodings: list[Encoding]) -> Padded:
        """Pad a batch to its longest row on the model's padding side."""
        longest = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), longest), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            span = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            ids[row, span] = encoding.ids
            mask[row, span] = 1
        return Padded(ids, mask)


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
