"""Real quality: the daemon's all-MiniLM-L6-v2 vectors equal sentence-transformers' encode().

Real sentences from Debian's fortunes (English, German, Spanish), sent as concurrent requests
of mixed sizes so they are batched and padded together, against encode() one call per text.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from akidb_embed_client import Client
from daemon_process import run_daemon
from fortunes import fortune_sentences
from minilm import find_minilm_source

SENTENCES = 200


@pytest.fixture(scope="module")
def expected() -> tuple[list[str], np.ndarray]:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = fortune_sentences(SENTENCES)
    model = sentence_transformers.SentenceTransformer(str(find_minilm_source()), device="cpu")
    return texts, model.encode(texts, batch_size=1, normalize_embeddings=False)


def test_daemon_matches_sentence_transformers(minilm_catalog: Path, expected: tuple[list[str], np.ndarray]) -> None:
    """1. 4 clients send the sentences in requests of 1..16  2. vectors come back in order  3. cosine ≥ 0.9999 each
    4. the model passed its load self-test on the golden vectors convert stored."""
    texts, want = expected
    got = np.zeros_like(want)
    chunks, start = [], 0
    while start < len(texts):  # consecutive requests of 1, 2, ... 16 texts, then again
        stop = min(start + 1 + len(chunks) % 16, len(texts))
        chunks.append((start, stop))
        start = stop
    with run_daemon(minilm_catalog) as daemon:

        def worker(share: list[tuple[int, int]]) -> None:
            with Client(daemon.socket, timeout=60, retries=1) as client:
                for start, stop in share:
                    reply = client.embed(texts[start:stop])
                    got[start:stop] = reply

        threads = [threading.Thread(target=worker, args=(chunks[n::4],)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with daemon.client() as client:
            reply = client.embed(texts[:2])
            (info,) = client.models()
    assert info["verification"] == "passed" and info["selftest"]["min_cosine"] >= 0.999, info["selftest"]
    print(f"\nself-test {info['selftest']}, load {info['load_ms']} ms")
    assert reply.model == "all-minilm-l6-v2" and reply.shape == (2, 384) and len(reply.fingerprint) == 16
    assert not (got == 0).all(axis=1).any(), "a sentence got no vector"
    cosines = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosines.min() >= 0.9999, (cosines.min(), texts[int(cosines.argmin())])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
