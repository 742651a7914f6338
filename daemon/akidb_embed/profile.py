"""Measured profiles: how fast a model runs on this device, with the provider it got (the ``bench`` op).

``measure`` goes through the model's own queue, as requests do, so it disturbs other traffic no
more than requests would: single texts one after another for latency, then jobs that fill one
tuned batch each for throughput. The cold-load time is that of the load serving now, without
the one-time footprint measurement of a model version's first load; the quality is its
self-test's. Profiles are stored by fingerprint and provider (``key``), so they survive
restarts and a new version has none until it is measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .batcher import Job
from .loader import LoadedModel
from .memory import MIB
from .parity import DEFAULT_SENTENCES

LATENCY_TEXTS = 100  # single-text requests timed by default
THROUGHPUT_SECONDS = 2.0  # batches are run for at least this long...
THROUGHPUT_ROUNDS = 3  # ...and at least this many times
SAMPLE = DEFAULT_SENTENCES[:-1]  # real sentences of 2 to 30 tokens (the last one is a 300-token join of them)


@dataclass(frozen=True)
class Profile:
    """One model version's measured figures on one provider."""

    fingerprint: str
    provider: str
    cold_load_ms: float
    p50_ms: float  # one text, submitted to its result
    p95_ms: float
    texts_per_s: float  # at the tuned batch
    batch_texts: int
    memory_mb: float  # the charge
    min_cosine: float | None  # the self-test's, None without golden vectors
    measured_at: float  # Unix time

    @property
    def key(self) -> str:
        return profile_key(self.fingerprint, self.provider)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(**data)


def profile_key(fingerprint: str, provider: str) -> str:
    return f"{fingerprint}/{provider}"


async def measure(model: LoadedModel, charge: Callable[[], int], latency_texts: int = LATENCY_TEXTS) -> Profile:
    """Time ``model`` through its queue: single texts, then tuned batches; the profile, with the model's ``charge``
    taken last (the bench's own batches may have raised its peak)."""
    singles = [await _run(model, [SAMPLE[i % len(SAMPLE)]]) for i in range(latency_texts)]
    batch = _batch_texts(model)
    texts = [SAMPLE[i % len(SAMPLE)] for i in range(batch)]
    rounds, started = 0, time.perf_counter()
    while rounds < THROUGHPUT_ROUNDS or time.perf_counter() - started < THROUGHPUT_SECONDS:
        await _run(model, texts)
        rounds += 1
    rate = rounds * batch / (time.perf_counter() - started)
    p50, p95 = np.percentile(np.array(singles) * 1e3, [50, 95])
    return Profile(
        model.fingerprint, model.backend.providers[0], round((model.load_seconds - model.measure_seconds) * 1e3, 1),
        round(float(p50), 3), round(float(p95), 3), round(rate, 1), batch, round(charge() / MIB, 1),
        model.selftest.min_cosine if model.selftest else None, time.time(),
    )  # fmt: skip


def _batch_texts(model: LoadedModel) -> int:
    """Sample texts that fill one batch as the model is tuned: its token budget, within max_batch."""
    lengths = [len(t.ids) for t in model.batcher.encoder.encode(list(SAMPLE))]
    return max(1, min(model.batcher.limits.max_batch, model.batcher.rule.max_tokens // max(lengths)))


async def _run(model: LoadedModel, texts: list[str]) -> float:
    """Seconds from queueing ``texts`` on the model to their vectors."""
    job = Job(texts, asyncio.get_running_loop().create_future())
    started = time.perf_counter()
    model.submit(job)
    await job.future
    return time.perf_counter() - started
