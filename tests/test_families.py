"""Each model family's pooling and prompt path, through a real daemon, against an unpadded reference.

The daemon batches texts of different lengths with padding; the reference embeds one text at a
time with no padding and plain numpy pooling (tests/tinymodels.py), so any pooling, padding,
ordering or prompt mistake shows as a cosine below 0.9999.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tinymodels
from akidb_embed_client import Client
from daemon_process import Daemon

TEXTS = [
    "what is the capital of france",
    "the cat sat on the mat",
    "a much longer sentence about the weather, which was cold and wet all week in the north of the country",
    "hi",
    "embedding models turn text into vectors that can be compared with a dot product",
]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    cosines = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosines.min() >= 0.9999, cosines


def reference(model_dir: Path, texts: list[str], pooling: str, **kwargs) -> np.ndarray:
    return np.stack([tinymodels.reference_embed(model_dir, text, pooling, **kwargs) for text in texts])


def test_bge_cls_pooling(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    with daemon.client() as client:
        got = client.embed(TEXTS, model="bge-tiny")
    assert got.shape == (5, 32) and got.dtype == np.float32 and got.model == "bge-tiny"
    assert_close(got, reference(tiny_models["encoder"], TEXTS, "cls"))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_default_model_serves_when_none_is_named(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert client.embed("hello").model == "bge-tiny"


@pytest.mark.parametrize("prompt, prefix", [("query", "query: "), ("passage", "passage: "), ("Custom: ", "Custom: ")])
def test_e5_mean_pooling_with_prompts(daemon: Daemon, tiny_models: dict[str, Path], prompt: str, prefix: str) -> None:
    with daemon.client() as client:
        got = client.embed(TEXTS, model="e5-tiny", prompt=prompt)
        plain = client.embed(TEXTS, model="e5-tiny")
    assert_close(got, reference(tiny_models["encoder"], [prefix + t for t in TEXTS], "mean"))
    assert_close(plain, reference(tiny_models["encoder"], TEXTS, "mean"))
    assert not np.allclose(got, plain, atol=1e-3), "the prompt made no difference"
    assert got.tokens != plain.tokens


def test_qwen3_last_token_instruction_and_left_padding(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    instruction = tinymodels.QWEN3_FIELDS["prompts"]["query"]
    with daemon.client() as client:
        got = client.embed(TEXTS, model="qwen3-tiny", prompt="query")
    assert got.shape == (5, 48)
    assert_close(got, reference(tiny_models["decoder"], [instruction + t for t in TEXTS], "last_token"))


@pytest.mark.parametrize("dimensions", [16, 32, 48])
def test_qwen3_matryoshka_dimensions(daemon: Daemon, tiny_models: dict[str, Path], dimensions: int) -> None:
    with daemon.client() as client:
        got = client.embed(TEXTS, model="qwen3-tiny", dimensions=dimensions)
    assert got.shape == (5, dimensions) and got.dimension == dimensions
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert_close(got, reference(tiny_models["decoder"], TEXTS, "last_token", dimensions=dimensions))


def test_normalize_false_keeps_raw_pooled_vectors(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    with daemon.client() as client:
        got = client.embed(TEXTS, model="e5-tiny", normalize=False)
    want = reference(tiny_models["encoder"], TEXTS, "mean", normalize=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_truncation_at_max_length_matches_reference(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    long_text = " ".join(TEXTS * 40)
    with daemon.client() as client:
        got = client.embed([long_text, "short"], model="bge-tiny")
    assert got.tokens[0] == 512
    assert_close(got, reference(tiny_models["encoder"], [long_text, "short"], "cls", max_length=512))


def test_concurrent_clients_each_get_their_own_rows(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    """1. 12 clients on 3 models at once  2. requests share batches  3. each reply is its own texts, in order."""
    expected = {
        "bge-tiny": reference(tiny_models["encoder"], TEXTS, "cls"),
        "e5-tiny": reference(tiny_models["encoder"], TEXTS, "mean"),
        "qwen3-tiny": reference(tiny_models["decoder"], TEXTS, "last_token"),
    }
    failures: list[BaseException] = []
    with daemon.client() as client:
        for model in expected:  # how many batches one request needs alone
            client.embed(TEXTS, model=model)
        alone = {m["id"]: m["batches"] for m in client.models() if m["id"] in expected}

    def worker(n: int) -> None:
        model = list(expected)[n % 3]
        order = [(i + n) % len(TEXTS) for i in range(len(TEXTS))]
        try:
            with Client(daemon.socket, timeout=30, retries=1) as client:
                for _ in range(10):
                    got = client.embed([TEXTS[i] for i in order], model=model)
                    assert_close(got, expected[model][order])
        except BaseException as exc:  # surfaced in the main thread below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    with daemon.client() as client:
        models = {m["id"]: m for m in client.models()}
    for model in expected:  # 40 requests each; had none shared a batch, each would need `alone` batches
        batches = models[model]["batches"] - alone[model]
        assert models[model]["requests"] == 41 and batches < 40 * alone[model], (model, batches, alone[model])
