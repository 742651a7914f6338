"""What the benchmark scripts share: progress lines, timing, rates and percentiles."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

BULK = 32


def progress(message: str) -> None:
    """A progress line on stderr (results go to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def latencies_ms(call: Callable[[list[str]], object], texts: list[str]) -> list[float]:
    """Round trip of each single-text call, in milliseconds."""
    out = []
    for text in texts:
        started = time.perf_counter()
        call([text])
        out.append((time.perf_counter() - started) * 1e3)
    return out


def bulk_rate(call: Callable[[list[str]], object], texts: list[str]) -> float:
    """Texts per second when sent BULK at a time."""
    started = time.perf_counter()
    for i in range(0, len(texts), BULK):
        call(texts[i : i + BULK])
    return len(texts) / (time.perf_counter() - started)


def p50(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


def p95(values: list[float]) -> float:
    """The 95th percentile."""
    return statistics.quantiles(values, n=20)[-1]


def timed_ms(call: Callable[[], object]) -> float:
    """How long one call took, in milliseconds."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e3
