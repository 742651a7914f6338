"""Live statistics of one model: what it served, how fast, and what happened to it in the cache.

Counters since start; a sliding window (the last minute, at most ``WINDOW_LIMIT`` requests) for
rates and latency percentiles; cumulative latency histograms for Prometheus. Each request's
latency is split into queue wait (submitted until its model's worker took it), inference
(tokenize, run, pool) and end to end (arrival until the reply is ready, a cold load included).
Updated and read on the event-loop thread only; recording a request is a few array writes.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAGES = ("queue", "inference", "total")
# Seconds; an embedding request takes from about a millisecond (one short text) to seconds (a cold load).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WINDOW_SECONDS = 60.0
WINDOW_LIMIT = 16384  # requests: bounds the memory and the cost of a percentile at any rate
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class Timing:
    """One served request's latency in seconds, by stage."""

    queue: float
    inference: float
    total: float


@dataclass
class Histogram:
    """Counts per ``LATENCY_BUCKETS`` bucket (the last one: above them all) and the sum observed."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, requests at or below it) per bucket, ending with (inf, all), as Prometheus counts."""
        bounds = (*LATENCY_BUCKETS, float("inf"))
        return list(zip(bounds, np.cumsum(self.counts).tolist()))


class ModelStats:
    """One model id's figures; they outlive its loads, swaps and evictions."""

    def __init__(self) -> None:
        self.requests = 0  # embed requests served
        self.texts = 0
        self.errors: Counter[str] = Counter()  # embed requests refused or failed, by error code
        self.hits = 0  # requests that found the model loaded
        self.misses = 0  # requests that had to wait for a load
        self.cold_loads = 0  # loads of a model that was not serving (a swap is not one)
        self.evictions = 0
        self.swaps = 0
        self.histograms = {stage: Histogram() for stage in STAGES}
        self._started = time.monotonic()
        # The window: a ring of the last WINDOW_LIMIT requests (arrays, so a percentile is one numpy call).
        self._times = np.full(WINDOW_LIMIT, -np.inf)  # time.monotonic() when served; -inf: empty slot
        self._texts = np.zeros(WINDOW_LIMIT, np.int64)
        self._latency = np.zeros((WINDOW_LIMIT, len(STAGES)))

    def served(self, texts: int, timing: Timing) -> None:
        self.requests += 1
        self.texts += texts
        seconds = (timing.queue, timing.inference, timing.total)
        for stage, value in zip(STAGES, seconds):
            self.histograms[stage].observe(value)
        slot = self.requests % WINDOW_LIMIT
        self._times[slot], self._texts[slot], self._latency[slot] = time.monotonic(), texts, seconds

    def took(self, loaded: bool) -> None:
        """A request takes the model: a cache hit if it was loaded, else a miss that waits for the load."""
        if loaded:
            self.hits += 1
        else:
            self.misses += 1

    def failed(self, code: str) -> None:
        self.errors[code] += 1

    def describe(self) -> dict[str, Any]:
        """The figures as plain data: counters, the last minute's rates and latency percentiles (ms)."""
        now = time.monotonic()
        recent = self._times >= now - WINDOW_SECONDS
        count = int(recent.sum())
        # Rates over the last minute, or over less: since these figures began, or what a full window holds.
        span = min(WINDOW_SECONDS, now - self._started)
        if count == WINDOW_LIMIT:
            span = min(span, now - float(self._times.min()))
        span = max(span, 1e-3)
        latency = _percentiles(self._latency[recent])
        return {
            "requests": self.requests,
            "texts": self.texts,
            "errors": dict(self.errors),
            "qps": round(count / span, 2),
            "texts_per_s": round(float(self._texts[recent].sum()) / span, 1),
            "window_requests": count,
            "latency_ms": dict(zip(STAGES, latency)),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / (self.hits + self.misses), 4) if self.hits + self.misses else None,
            "cold_loads": self.cold_loads,
            "evictions": self.evictions,
            "swaps": self.swaps,
        }


def _percentiles(seconds: np.ndarray) -> list[dict[str, float | None]]:
    """p50/p95/p99 in ms of each stage (column), None for an empty window (no figure rather than a made-up 0)."""
    if not len(seconds):
        return [{f"p{p}": None for p in PERCENTILES} for _ in STAGES]
    values = np.percentile(seconds * 1e3, PERCENTILES, axis=0)  # [percentile, stage]
    return [{f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, column)} for column in values.T]
