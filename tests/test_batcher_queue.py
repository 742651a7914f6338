"""The batcher's queue and fan-out, on a fake backend (the ``backend.Backend`` protocol).

A fake here is the point: it makes a model's output a known function of its input, and lets a
test fail one batch on purpose, which a real session cannot be told to do. The tokenizer is a
real one (the tiny encoder's); the queue, worker thread, batch cuts, pooling and hand-back are the
daemon's own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tinymodels
from akidb_embed.batcher import Batcher, Job
from akidb_embed.footprint import Footprint
from akidb_embed.settings import Limits
from akidb_embed.tokenize import Padded, TextEncoder
from akidb_embed.tuning import Tuning
from akidb_embed_client.errors import InternalError, Overloaded

DIMENSION = 4
POISON = "poison"  # a text whose batch the fake backend fails


class FakeBackend:
    """Token states that are a function of the token id alone: mean pooling gives each text's mean id."""

    providers = ["FakeExecutionProvider"]

    def __init__(self, poison_id: int) -> None:
        self.poison_id = poison_id
        self.shapes: list[tuple[int, int]] = []

    def run(self, batch: Padded) -> np.ndarray:
        self.shapes.append(batch.ids.shape)
        if (batch.ids == self.poison_id).any():
            raise RuntimeError("the fake backend fails batches with the poison token")
        return np.repeat(batch.ids[..., None].astype(np.float32), DIMENSION, axis=-1) * np.arange(1, DIMENSION + 1)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    folder = tmp_path_factory.mktemp("tokenizer")
    path = folder / tinymodels.TOKENIZER_FILE
    tinymodels.build_encoder_tokenizer().save(str(path))
    return TextEncoder(Path(path), 64, "right")


def expected(encoder: TextEncoder, text: str) -> np.ndarray:
    ids = encoder.encode([text])[0].ids
    return float(np.mean(ids)) * np.arange(1, DIMENSION + 1, dtype=np.float32)


async def run_jobs(encoder: TextEncoder, groups: list[list[str]], *, batch_tokens: int = 64, **job: object) -> tuple[list, FakeBackend]:
    """Submit one job per group at once; the outcomes (Embedded or the exception) and the fake backend."""
    loop = asyncio.get_running_loop()
    backend = FakeBackend(int(encoder.encode([POISON])[0].ids[1]))
    footprint = Footprint(0, 1 << 30, 0, 1.0, 0.0, 0, Tuning(0, 1000, batch_tokens, 0))
    limits = Limits(max_batch=8, batch_tokens=batch_tokens)
    batcher = Batcher("fake", encoder, backend, "mean", DIMENSION, limits, footprint, loop)
    try:
        jobs = [Job(texts, loop.create_future(), normalize=False, **job) for texts in groups]
        for j in jobs:
            batcher.submit(j)
        outcomes = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
    finally:
        batcher.close()
    return outcomes, backend


def test_each_job_gets_its_own_vectors_in_input_order(encoder: TextEncoder) -> None:
    groups = [["the cat sleeps in the warm sun", "a"], ["what is the capital of france?"], ["rice", "water", "boil it now"]]
    outcomes, backend = asyncio.run(run_jobs(encoder, groups))
    for texts, embedded in zip(groups, outcomes):
        assert embedded.vectors.shape == (len(texts), DIMENSION)
        np.testing.assert_allclose(embedded.vectors, [expected(encoder, t) for t in texts], rtol=1e-6)
        assert embedded.tokens == [len(encoder.encode([t])[0].ids) for t in texts]
    assert all(rows * longest <= 64 for rows, longest in backend.shapes)  # every batch within the token budget


def test_a_failing_batch_fails_only_the_jobs_with_texts_in_it(encoder: TextEncoder) -> None:
    # Short texts and the poison share one batch; the long text is cut into a batch of its own by the token budget.
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    outcomes, backend = asyncio.run(run_jobs(encoder, [["a", POISON], [long_text], ["b"]], batch_tokens=40))
    assert isinstance(outcomes[0], InternalError) and "fake backend" in outcomes[0].message
    np.testing.assert_allclose(outcomes[1].vectors[0], expected(encoder, long_text), rtol=1e-6)
    assert isinstance(outcomes[2], InternalError)  # it shared the poisoned batch
    assert len(backend.shapes) == 2


def test_a_job_past_its_deadline_is_answered_without_running(encoder: TextEncoder) -> None:
    outcomes, backend = asyncio.run(run_jobs(encoder, [["late"]], deadline=0.0))
    assert isinstance(outcomes[0], Overloaded) and "timeout_ms" in outcomes[0].message
    assert backend.shapes == []


def test_jobs_carry_their_queue_and_inference_times(encoder: TextEncoder) -> None:
    async def timed() -> Job:
        loop = asyncio.get_running_loop()
        footprint = Footprint(0, 1 << 30, 0, 1.0, 0.0, 0, Tuning(0, 1000, 64, 0))
        batcher = Batcher("fake", encoder, FakeBackend(-1), "mean", DIMENSION, Limits(), footprint, loop)
        job = Job(["a text"], loop.create_future())
        batcher.submit(job)
        await job.future
        batcher.close()
        return job

    job = asyncio.run(timed())
    assert 0 < job.queued <= job.started <= job.finished
