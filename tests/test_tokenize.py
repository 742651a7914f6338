"""Tokenization: a BPE model's encoder leaves nothing behind once it is gone, and encodes as the tokenizer does."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import random
import string
from pathlib import Path

import pytest
from akidb_embed.tokenize import TextEncoder
from tokenizers import Tokenizer

LOADS, WARM_LOADS = 40, 10
# Bytes the heap may keep per load and unload (measured: 1.9 MB with the word cache, about 350 B without).
KEPT_PER_LOAD = 4096


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (not what it keeps free: no allocator noise)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    libc.mallinfo2.restype = _Mallinfo2
    gc.collect()
    return libc.mallinfo2().uordblks


def _texts(rng: random.Random) -> list[str]:
    """A request's texts of made-up words: each new word is one a word cache would keep."""
    return [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(30))
            for _ in range(rng.randint(1, 16))]  # fmt: skip


def test_a_bpe_models_encoder_leaves_nothing_in_the_threads_that_encoded(tiny_models: dict[str, Path]) -> None:
    """1. Load the Qwen3-style (byte-level BPE) tokenizer, encode 20 requests with it (encode_batch runs on
       tokenizers' own threads, which live on), drop it; 2. again, as the daemon does at each load and unload;
    3. after a warm-up, the heap in use grows by less than KEPT_PER_LOAD bytes per load."""
    rng = random.Random(7)
    start = 0
    for load in range(WARM_LOADS + LOADS):
        if load == WARM_LOADS:
            start = _heap_in_use()
        encoder = TextEncoder(tiny_models["decoder"] / "tokenizer.json", 64, "left")
        for _ in range(20):
            encoder.encode(_texts(rng))
        del encoder
    kept = (_heap_in_use() - start) / LOADS
    assert kept < KEPT_PER_LOAD, f"{kept:.0f} bytes kept per load and unload"


def test_the_encoder_gives_the_tokenizers_own_ids(tiny_models: dict[str, Path]) -> None:
    """Without its word cache, the encoder still gives what the tokenizer gives with it (twice: cached words too)."""
    path = tiny_models["decoder"] / "tokenizer.json"
    encoder, reference = TextEncoder(path, 64, "left"), Tokenizer.from_file(str(path))
    reference.enable_truncation(64)
    texts = _texts(random.Random(3)) * 2
    assert [t.ids.tolist() for t in encoder.encode(texts)] == [e.ids for e in reference.encode_batch(texts)]
