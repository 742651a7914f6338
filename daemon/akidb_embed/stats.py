"""Live statistics of one model: what it served, how fast, and what happened to it in the cache.

Counters since start; a sliding window (the last minute, at most ``WINDOW_LIMIT`` requests) for
rates and latency percentiles; cumulative latency histograms for Prometheus. Each request's
latency is split into queue wait (submitted until its model's worker took it), inference
(tokenize, run, pool) and end to end (arrival until the reply is ready, a cold load included).
Updated and read on the event-loop thread only; recording a request is a few appends.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque
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
        self._window: deque[tuple[float, int, Timing]] = deque(maxlen=WINDOW_LIMIT)

    def served(self, texts: int, timing: Timing) -> None:
        self.requests += 1
        self.texts += texts
        for stage in STAGES:
            self.histograms[stage].observe(getattr(timing, stage))
        self._window.append((time.monotonic(), texts, timing))

    def failed(self, code: str) -> None:
        self.errors[code] += 1

    def describe(self) -> dict[str, Any]:
        """The figures as plain data: counters, the last minute's rates and latency percentiles (ms)."""
        recent = self._recent()
        span = WINDOW_SECONDS
        if len(recent) == WINDOW_LIMIT:  # the window is full before a minute passes: rates over what it holds
            span = max(time.monotonic() - recent[0][0], 1e-3)
        return {
            "requests": self.requests,
            "texts": self.texts,
            "errors": dict(self.errors),
            "qps": round(len(recent) / span, 2),
            "texts_per_s": round(sum(texts for _, texts, _ in recent) / span, 1),
            "window_requests": len(recent),
            "latency_ms": {stage: _percentiles([getattr(t, stage) for _, _, t in recent]) for stage in STAGES},
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / (self.hits + self.misses), 4) if self.hits + self.misses else None,
            "cold_loads": self.cold_loads,
            "evictions": self.evictions,
            "swaps": self.swaps,
        }

    def _recent(self) -> list[tuple[float, int, Timing]]:
        """The window's requests of the last minute (older ones are dropped here, not on every request)."""
        horizon = time.monotonic() - WINDOW_SECONDS
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()
        return list(self._window)


def _percentiles(seconds: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms, None for an empty window (no figure rather than a made-up zero)."""
    if not seconds:
        return {f"p{p}": None for p in PERCENTILES}
    values = np.percentile(np.asarray(seconds) * 1e3, PERCENTILES)
    return {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, values)}
