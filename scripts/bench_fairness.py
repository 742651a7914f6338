"""Fairness: one app's single queries while another app streams bulk requests, on one daemon.

Two tenants on sockets of their own: A (bulk) streams 256-text requests from ``STREAMS`` clients,
each sending its next request as soon as the last is answered, as an indexing job does; B (query)
sends single texts one after another. Measured: B's latency on the idle daemon, A's rate alone,
then both at once: B's latency behind the stream and the texts per second of both together. The
targets: B's p95 at most 3x its idle p95, and the total rate at least 0.9x A's alone.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from akidb_embed.manifest import Manifest
from akidb_embed_client import Client
from benchutil import Target, latencies_ms, p50, p95, print_targets, progress
from daemon_process import run_daemon

BULK_TEXTS = 256  # texts in one bulk request
STREAMS = 2  # bulk clients of tenant A, as in the measurement
SECONDS = 15.0  # each timed phase
SINGLES = 200  # B's texts on the idle daemon
TENANTS = [{"name": "bulk"}, {"name": "query"}]


def fairness_section(catalog: Path, manifest: Manifest, texts: list[str]) -> dict[str, Any]:
    """B's p50/p95 idle and behind A's stream, A's rate alone and the total rate with both; printed and returned."""
    bulk = [texts[i % len(texts)] for i in range(BULK_TEXTS)]
    with run_daemon(catalog, providers=["cpu"], tenants=TENANTS) as daemon:
        sockets = {t["name"]: daemon.socket.parent / f"{t['name']}.sock" for t in TENANTS}
        with Client(sockets["query"], timeout=120) as query:
            query.embed("warm up", model=manifest.id)
            progress(f"fairness: {SINGLES} single texts on the idle daemon")
            idle = latencies_ms(lambda batch: query.embed(batch, model=manifest.id), texts[:SINGLES])
            progress(f"fairness: tenant A alone, {STREAMS} clients streaming {BULK_TEXTS}-text requests")
            alone = _stream(sockets["bulk"], manifest.id, bulk, lambda: time.sleep(SECONDS))
            progress("fairness: tenant A streaming while tenant B sends single texts")
            loaded: list[float] = []

            def singles() -> None:
                deadline = time.perf_counter() + SECONDS
                while time.perf_counter() < deadline:
                    loaded.extend(latencies_ms(lambda batch: query.embed(batch, model=manifest.id), [texts[len(loaded) % len(texts)]]))

            both = _stream(sockets["bulk"], manifest.id, bulk, singles)
    total = both["texts_per_s"] + len(loaded) / both["seconds"]
    figures = {
        "idle_p50_ms": p50(idle), "idle_p95_ms": p95(idle), "loaded_p50_ms": p50(loaded), "loaded_p95_ms": p95(loaded),
        "loaded_singles": len(loaded), "alone_texts_per_s": alone["texts_per_s"], "total_texts_per_s": total,
        "bulk_texts_per_s_with_singles": both["texts_per_s"], "bulk_texts": BULK_TEXTS, "streams": STREAMS,
    }  # fmt: skip
    print(f"\n{'fairness: ' + manifest.id:<46} {'value':>12}")
    for name, key, unit in [("B single text p50, idle", "idle_p50_ms", "ms"), ("B single text p95, idle", "idle_p95_ms", "ms"),
                            ("B single text p50, behind A's stream", "loaded_p50_ms", "ms"),
                            ("B single text p95, behind A's stream", "loaded_p95_ms", "ms"),
                            ("A alone", "alone_texts_per_s", "texts/s"), ("A and B together", "total_texts_per_s", "texts/s")]:  # fmt: skip
        print(f"{name:<46} {figures[key]:>10.1f}{unit}")
    print_targets([
        Target("B's p95 behind the stream / B's p95 idle", figures["loaded_p95_ms"] / figures["idle_p95_ms"], 3.0, False),
        Target("total throughput / A alone", total / alone["texts_per_s"], 0.9, True),
    ])  # fmt: skip
    return figures


def _stream(socket: Path, model: str, bulk: list[str], meanwhile: Any) -> dict[str, float]:
    """Run ``meanwhile()`` while STREAMS clients send ``bulk`` requests back to back; their texts per second.

    Each request's texts count as done evenly from its send to its reply, so the rate over the window has no
    error of whole requests (fair batching finishes the streams' requests together, in bursts).
    """
    stop = threading.Event()
    spans: list[tuple[float, float]] = []  # perf_counter() at each bulk request's send and reply

    def stream() -> None:
        with Client(socket, timeout=300) as client:
            while not stop.is_set():
                sent = time.perf_counter()
                client.embed(bulk, model=model)
                spans.append((sent, time.perf_counter()))

    threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)  # the stream under way before the timing starts
    started = time.perf_counter()
    meanwhile()
    ended = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join()

    def done(at: float) -> float:
        return sum(len(bulk) * min(1.0, max(0.0, (at - sent) / (reply - sent))) for sent, reply in spans)

    return {"texts_per_s": (done(ended) - done(started)) / (ended - started), "seconds": ended - started}
