"""The cost of the daemon's live statistics, against the request rate it must keep up with.

Keeping the statistics costs the event loop a ``ModelStats.served`` per request, and a
``describe`` (the percentiles of a full window) per ``status``/``models`` call: `akidb-embed top`
makes one of each a second, the metrics textfile one every few seconds. Both are timed here with
the window full, the worst case, and set against the busiest request rate the daemon reaches on
this machine (16 clients sending one text each, measured in the same run), so the share is that
of the smallest requests, where it is largest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from akidb_embed.manifest import Manifest
from akidb_embed.stats import WINDOW_LIMIT, ModelStats, Timing
from akidb_embed_client import Client
from benchutil import CONCURRENT, Target, concurrent_rate, print_targets, progress
from daemon_process import run_daemon

READS_PER_SECOND = 1.5  # top's status and models calls each second, and the metrics' every few seconds


def stats_section(catalog: Path, manifest: Manifest, texts: list[str]) -> dict[str, Any]:
    """Microseconds per request and per read of the statistics, the busiest request rate, and the share."""
    served_us, describe_ms = stats_costs()
    progress(f"statistics: the request rate of {CONCURRENT} clients sending single texts")
    with run_daemon(catalog, providers=["cpu"]) as daemon, Client(daemon.socket, timeout=120) as client:
        client.embed("warm up", model=manifest.id)
        rate, _ = concurrent_rate(daemon.socket, manifest.id, texts)
    share = (served_us * rate + describe_ms * 1e3 * READS_PER_SECOND) / 1e6
    figures = {"served_us": served_us, "describe_ms": describe_ms, "requests_per_s": rate, "share": share}
    print(f"\n{'statistics: ' + manifest.id:<46} {'value':>12}")
    print(f"{'recording one request':<46} {served_us:>10.2f}µs")
    print(f"{'percentiles of a full window (' + str(WINDOW_LIMIT) + ')':<46} {describe_ms:>10.2f}ms")
    print(f"{'busiest request rate (single texts)':<46} {rate:>10.0f}/s")
    print_targets([Target("statistics' share of the event loop's time", share * 100, 1.0, False, " %")])
    return figures


def stats_costs(rounds: int = 50000) -> tuple[float, float]:
    """µs per ``served`` and ms per ``describe``, with the window full."""
    stats = ModelStats()
    timing = Timing(0.001, 0.004, 0.006)
    started = time.perf_counter()
    for _ in range(rounds):
        stats.served(1, timing)
    served_us = (time.perf_counter() - started) / rounds * 1e6
    reads = 20
    started = time.perf_counter()
    for _ in range(reads):
        stats.describe()
    return served_us, (time.perf_counter() - started) / reads * 1e3
