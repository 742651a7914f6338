"""Live statistics: the counts are what the clients sent, under concurrency too, and the
percentiles are those of the requests in the window.

Steps of the daemon scenarios: 1. clients send known requests (good and bad) to real tiny models;
2. ``models`` and ``status`` are read; 3. every counter equals what was sent.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from akidb_embed.stats import LATENCY_BUCKETS, STAGES, ModelStats, Timing
from akidb_embed_client.errors import BadRequest
from daemon_process import Daemon, run_daemon, wait_for
from tinymodels import E5_FIELDS, write_manifest


def stats_of(daemon: Daemon, model_id: str) -> dict:
    with daemon.client() as client:
        return next(m for m in client.models() if m["id"] == model_id)["stats"]


def test_counts_are_what_the_clients_sent(daemon: Daemon) -> None:
    sizes = [1, 3, 2, 5, 1, 4]
    with daemon.client() as client:
        for size in sizes:
            client.embed([f"text {i} of {size}" for i in range(size)], "e5-tiny")
        with pytest.raises(BadRequest):
            client.embed("a text", "e5-tiny", dimensions=7)  # not one of the model's dimensions
        status = client.status()
    stats = stats_of(daemon, "e5-tiny")
    assert (stats["requests"], stats["texts"], stats["errors"]) == (len(sizes), sum(sizes), {"bad_request": 1})
    assert (stats["misses"], stats["hits"], stats["cold_loads"]) == (1, len(sizes) - 1, 1)  # refused before it took one
    assert stats["window_requests"] == len(sizes) and stats["qps"] > 0
    latency = stats["latency_ms"]
    for p in ("p50", "p95", "p99"):  # each request's total includes its inference: so does every percentile
        assert 0 < latency["inference"][p] <= latency["total"][p]
    assert status["stats"]["e5-tiny"]["requests"] == len(sizes)
    assert status["stats"]["bge-tiny"] == {
        "requests": 0, "texts": 0, "qps": 0.0, "texts_per_s": 0.0, "hit_rate": None, "errors": 0, "p95_ms": None,
    }  # fmt: skip


def test_counts_stay_exact_with_many_clients_at_once(daemon: Daemon) -> None:
    clients, each = 8, 25
    failures: list[BaseException] = []

    def send(worker: int) -> None:
        try:
            with daemon.client() as client:
                for i in range(each):
                    client.embed([f"worker {worker} request {i}"] * (1 + i % 3), "bge-tiny")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    stats = stats_of(daemon, "bge-tiny")
    assert stats["requests"] == clients * each
    assert stats["texts"] == clients * sum(1 + i % 3 for i in range(each))
    assert stats["hits"] + stats["misses"] == clients * each and stats["cold_loads"] == 1


def test_evictions_are_counted_per_model(catalog) -> None:
    with run_daemon(catalog, memory={"max_loaded_models": 1}) as daemon:
        with daemon.client() as client:
            client.embed("one", "bge-tiny")
            client.embed("two", "e5-tiny")  # room for one model: bge-tiny goes
        assert (stats_of(daemon, "bge-tiny")["evictions"], stats_of(daemon, "e5-tiny")["evictions"]) == (1, 0)


def test_a_hot_swap_is_counted_and_is_not_a_cold_load(daemon: Daemon, tiny_models) -> None:
    with daemon.client() as client:
        client.embed("one", "e5-tiny")
    write_manifest(daemon.catalog, "e5-tiny", tiny_models["encoder"], **{**E5_FIELDS, "name": "a new version"})
    wait_for(lambda: stats_of(daemon, "e5-tiny")["swaps"] == 1, timeout=30)
    assert stats_of(daemon, "e5-tiny")["cold_loads"] == 1


def test_percentiles_are_those_of_the_window() -> None:
    stats = ModelStats()
    totals = np.random.default_rng(0).uniform(0.001, 0.2, 500)
    for total in totals:
        stats.served(2, Timing(total / 4, total / 2, total))
    described = stats.describe()
    assert described["texts"] == 1000 and described["window_requests"] == 500
    want = np.percentile(totals * 1e3, [50, 95, 99])
    got = [described["latency_ms"]["total"][p] for p in ("p50", "p95", "p99")]
    np.testing.assert_allclose(got, want, atol=1e-3)
    for stage in STAGES:  # the histograms count every request once
        assert stats.histograms[stage].cumulative()[-1] == (float("inf"), 500)
    below_10ms = dict(stats.histograms["total"].cumulative())[0.01]
    assert below_10ms == int(np.sum(totals <= 0.01)) and LATENCY_BUCKETS[3] == 0.01


def test_requests_older_than_a_minute_leave_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    stats, now = ModelStats(), [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the window's clock, moved on instead of waited for
    stats.served(1, Timing(0.001, 0.002, 0.003))
    now[0] += 61
    stats.served(1, Timing(0.001, 0.002, 0.005))
    described = stats.describe()
    assert described["window_requests"] == 1 and described["latency_ms"]["total"]["p50"] == 5.0
    assert described["requests"] == 2  # the counters keep everything


def test_rates_in_the_first_minute_are_over_the_time_observed(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [500.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    stats = ModelStats()
    for _ in range(30):
        stats.served(2, Timing(0.001, 0.002, 0.003))
    now[0] += 10  # 30 requests in the daemon's first 10 s: 3 per second, not 30 / 60
    assert (stats.describe()["qps"], stats.describe()["texts_per_s"]) == (3.0, 6.0)
