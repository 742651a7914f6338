"""Prometheus metrics: the registry's figures as metric families, in a node_exporter textfile and,
if configured, over HTTP on a loopback address.

The textfile (a temporary file renamed into place, readable by node_exporter's user) is
rewritten every ``metrics.interval_seconds`` from the event loop, so the daemon opens no TCP
port by default. Every catalog model has its series from the first write, right after
readiness. The figures live on the event loop: an HTTP scrape, which arrives on
prometheus_client's own thread, has the loop collect them and waits for the answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .memory import MIB
from .registry import Registry
from .settings import Settings
from .tenancy import QUOTAS, Tenants

log = logging.getLogger(__name__)
PREFIX = "akidb_embed_"
STATES = ("invalid", "disabled", "available", "loading", "ready", "failed")
SCRAPE_TIMEOUT = 5.0  # seconds an HTTP scrape waits for the event loop


class DaemonCollector(Collector):
    """Collects the registry's figures; on the event loop, whichever thread asks."""

    def __init__(self, registry: Registry, tenants: Tenants, started: float, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = registry
        self.tenants = tenants
        self.started = started
        self.loop = loop
        self._loop_thread = threading.get_ident()  # built on the loop's thread

    def collect(self) -> Iterator[Metric]:
        if threading.get_ident() == self._loop_thread:
            return iter(self.families())
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(self._collect_into, answer)
        return iter(answer.result(timeout=SCRAPE_TIMEOUT))

    def _collect_into(self, answer: concurrent.futures.Future) -> None:
        """On the loop: the families, or the error that kept them, for the scrape's thread."""
        try:
            answer.set_result(self.families())
        except Exception as exc:  # the scrape fails with the cause at once, not after a timeout
            answer.set_exception(exc)

    def families(self) -> list[Metric]:
        """Every family, from one snapshot of the registry."""
        snapshot = self.registry.snapshot()
        families = [*_daemon_families(snapshot.memory, self.registry, self.started)]
        per_model = _model_families()
        for model in snapshot.models:
            _add_model(per_model, model)
        for model_id, stats in self.registry.model_stats().items():
            for stage, histogram in stats.histograms.items():
                buckets = [(_bound(le), count) for le, count in histogram.cumulative()]
                per_model["request_duration_seconds"].add_metric([model_id, stage], buckets, histogram.sum)
        return families + list(per_model.values()) + _tenant_families(self.tenants)


class MetricsExporter:
    """The textfile writer task and, if configured, the HTTP endpoint."""

    def __init__(self, settings: Settings, registry: Registry, tenants: Tenants, started: float) -> None:
        self.settings = settings.metrics
        self.textfile = settings.metrics_textfile
        self.collectors = CollectorRegistry(auto_describe=False)
        self.collectors.register(DaemonCollector(registry, tenants, started, asyncio.get_running_loop()))
        self._server: Any = None
        self._failed = False  # the textfile could not be written: said once, not every interval

    def start_http(self) -> None:
        """Serve /metrics on the configured loopback address, if any."""
        if not self.settings.http:
            return
        host, port = self.settings.http_address
        self._server, _ = start_http_server(port, host, registry=self.collectors)
        log.info("metrics served on http://%s:%d/metrics", host, port)

    async def run(self) -> None:
        """Write the textfile now and every interval until cancelled, then a last time."""
        try:
            while True:
                self.write()
                await asyncio.sleep(self.settings.interval_seconds)
        finally:
            self.write()

    def write(self) -> None:
        if self.textfile is None:
            return
        try:
            write_readable(self.textfile, generate_latest(self.collectors))
            self._failed = False
        except OSError as exc:
            if not self._failed:
                log.warning("cannot write the metrics textfile %s (%s): fix its directory's permissions or set "
                            "metrics.textfile (\"\" turns it off)", self.textfile, exc)  # fmt: skip
            self._failed = True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def write_readable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed into place), readable by all.

    node_exporter runs as a user of its own, and the figures are not secret: the folder and the file get
    0755 and 0644 whatever the daemon's umask, and the mode is set before the rename, so no scrape finds
    the file unreadable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.stat().st_uid == os.getuid():  # a folder someone else made (node_exporter's) keeps its mode
        os.chmod(path.parent, 0o755)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _daemon_families(memory: dict[str, Any], registry: Registry, started: float) -> Iterator[Metric]:
    info = GaugeMetricFamily(PREFIX + "info", "The daemon's version.", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield GaugeMetricFamily(PREFIX + "uptime_seconds", "Seconds since the daemon started.", time.time() - started)
    source = [str(memory["source"]).split(" (")[0]]  # without a passing remark, e.g. "(tegrastats starting)"
    for key, text in (("total", "Memory the daemon sees in all."), ("available", "Memory still available."),
                      ("used", "Memory in use (total - available).")):  # fmt: skip
        gauge = GaugeMetricFamily(f"{PREFIX}memory_{key}_bytes", text + " From the memory source.", labels=["source"])
        gauge.add_metric(source, memory[key])
        yield gauge
    pressure = GaugeMetricFamily(PREFIX + "memory_pressure_ratio", "Used over total, 0 to 1.", labels=["source"])
    pressure.add_metric(source, memory["pressure"])
    yield pressure
    yield GaugeMetricFamily(PREFIX + "resident_memory_bytes", "The daemon's resident set size.", memory["own_rss"])
    cap = registry.settings.memory.model_memory_mb * MIB
    yield GaugeMetricFamily(PREFIX + "model_memory_budget_bytes", "Cap on the loaded models' charges; 0: none.", cap)


def _model_families() -> dict[str, Metric]:
    """The per-model families, empty, by name without the prefix."""
    counter, gauge = CounterMetricFamily, GaugeMetricFamily
    specs = [
        (counter, "requests", "Embed requests by outcome: ok, or the error code.", ["model", "code"]),
        (counter, "texts", "Texts embedded.", ["model"]),
        (counter, "model_loads", "Loads of a model while no version of it was loaded.", ["model"]),
        (counter, "model_evictions", "Unloads to make room or under memory pressure.", ["model"]),
        (counter, "model_swaps", "Hot swaps to a new version.", ["model"]),
        (counter, "cache_hits", "Requests that found their model loaded.", ["model"]),
        (counter, "cache_misses", "Requests that waited for their model's load.", ["model"]),
        (gauge, "model_state", "1 for the model's current state.", ["model", "state"]),
        (gauge, "model_loaded", "1 while a version of the model is loaded.", ["model"]),
        (gauge, "model_memory_bytes", "What the loaded model is charged: weights and working budget.", ["model"]),
        (gauge, "model_queued_texts", "Texts waiting in the model's queue.", ["model"]),
        (gauge, "model_in_flight", "Embed requests holding the model.", ["model"]),
        (gauge, "model_circuit_open", "1 while the model's circuit is open or half-open: refused after failures.",
         ["model"]),
    ]
    families = {name: kind(PREFIX + name, text, labels=labels) for kind, name, text, labels in specs}
    families["request_duration_seconds"] = HistogramMetricFamily(
        PREFIX + "request_duration_seconds", "Embed latency by stage: queue wait, inference, end to end.",
        labels=["model", "stage"],
    )  # fmt: skip
    return families


def _add_model(families: dict[str, Metric], model: dict[str, Any]) -> None:
    """One model's series (its histograms come from its ModelStats)."""
    model_id, stats, loaded = model["id"], model["stats"], model.get("fingerprint") is not None
    families["requests"].add_metric([model_id, "ok"], stats["requests"])
    for code, count in sorted(stats["errors"].items()):
        families["requests"].add_metric([model_id, code], count)
    for name, key in (("texts", "texts"), ("model_loads", "cold_loads"), ("model_evictions", "evictions"),
                      ("model_swaps", "swaps"), ("cache_hits", "hits"), ("cache_misses", "misses")):  # fmt: skip
        families[name].add_metric([model_id], stats[key])
    for state in STATES:
        families["model_state"].add_metric([model_id, state], int(model["state"] == state))
    families["model_loaded"].add_metric([model_id], int(loaded))
    families["model_memory_bytes"].add_metric([model_id], model["memory_mb"] * MIB if loaded else 0)
    families["model_queued_texts"].add_metric([model_id], model.get("queued_texts", 0))
    families["model_in_flight"].add_metric([model_id], model.get("in_flight", 0))
    families["model_circuit_open"].add_metric([model_id], int(model["circuit"]["state"] != "closed"))


def _tenant_families(tenants: Tenants) -> list[Metric]:
    """Each tenant's requests by outcome, texts, refusals by quota, and what it has in flight and queued."""
    label = ["tenant"]
    requests = CounterMetricFamily(PREFIX + "tenant_requests", "Embed requests of a tenant by outcome: ok, or the "
                                   "error code.", labels=["tenant", "code"])  # fmt: skip
    texts = CounterMetricFamily(PREFIX + "tenant_texts", "Texts embedded for a tenant.", labels=label)
    refused = CounterMetricFamily(PREFIX + "tenant_refused", "Requests of a tenant refused by a quota: max_in_flight, "
                                  "max_queued_texts or cache_ops.", labels=["tenant", "quota"])  # fmt: skip
    in_flight = GaugeMetricFamily(PREFIX + "tenant_in_flight", "Requests of a tenant waiting now.", labels=label)
    queued = GaugeMetricFamily(PREFIX + "tenant_queued_texts", "Texts of a tenant's embed requests not yet answered.",
                               labels=label)  # fmt: skip
    for tenant in tenants.all:
        usage = tenants.usage[tenant.name]
        requests.add_metric([tenant.name, "ok"], usage.requests["ok"])
        for code, count in sorted(usage.requests.items()):
            if code != "ok":
                requests.add_metric([tenant.name, code], count)
        texts.add_metric([tenant.name], usage.texts)
        for quota in QUOTAS:
            refused.add_metric([tenant.name, quota], usage.refused[quota])
        in_flight.add_metric([tenant.name], usage.in_flight)
        queued.add_metric([tenant.name], usage.queued_texts)
    return [requests, texts, refused, in_flight, queued]


def _bound(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(le)
