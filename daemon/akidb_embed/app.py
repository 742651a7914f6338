"""Daemon lifecycle: build the parts in order, bind, serve, and tear down in reverse.

Signal handlers only set flags or schedule work on the loop: SIGTERM/SIGINT stop it (a second
one exits at once), SIGHUP rescans the catalog. Readiness comes first; previously warm and
pinned models reload in the background afterwards. systemd hears about each step (``systemd``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable

from .backpressure import raise_descriptor_limit
from .engine import Engine
from .folders import check_cache_dir
from .memory import MemoryMonitor, process_rss, tune_malloc
from .metrics import MetricsExporter
from .registry import Registry
from .server import Server
from .settings import Settings
from .state import StateStore
from .tenancy import Caller
from .upkeep import Upkeep, warm_start
from .systemd import Notifier, status_line
from .watcher import CatalogWatcher, model_directories

log = logging.getLogger(__name__)
# Test-only: with this set to 1, SIGUSR2 hangs the serving loop so that tests can watch the
# systemd watchdog pings stop. Never set it in production; without it SIGUSR2 keeps its default.
TEST_HANG_ENV = "AKIDB_EMBED_TEST_HANG_SIGNAL"


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; the process exit code."""
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    tune_malloc()
    log.info("open descriptors up to %d (each client connection holds one)", raise_descriptor_limit())
    # The runtime is the daemon's, not any one model's: loaded before the idle size is taken.
    import onnxruntime  # noqa: F401

    loop = asyncio.get_running_loop()
    notifier = Notifier()
    monitor = MemoryMonitor(_tegrastats(settings), settings.memory.tegrastats_interval_ms)
    registry = Registry(settings, monitor, StateStore(settings.state_dir))
    engine = Engine(settings, registry)
    server = Server(settings, engine)
    server.bind()  # first: a socket in use stops the daemon before any thread or child starts
    registry.store.write()  # a full or read-only state folder is said at start, not at the first load
    check_cache_dir(settings.cache_dir)
    registry.events.bind(settings.events_path, server.context)
    monitor.start()

    phase = "serving"  # "stopping" once the drain begins

    def describe() -> str:
        return status_line(engine.status({}, Caller(engine.tenants.main))[0], phase)

    def report() -> None:
        """Tell systemd what is loaded, the memory and the requests in flight (if that changed)."""
        notifier.status(describe())

    def rescan() -> None:
        registry.scan()
        report()

    watcher = CatalogWatcher(
        settings.catalog,
        rescan,
        loop,
        extra_directories=lambda: model_directories(e.manifest for e in registry.entries.values() if e.manifest),
    )
    watcher.start()  # before the first scan: nothing written in between is missed
    registry.scan()
    watcher.sync()  # the model directories are known once the manifests are
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_stop_signal, stop)
    loop.add_signal_handler(signal.SIGHUP, _reload, registry, watcher, notifier, describe)
    if os.environ.get(TEST_HANG_ENV) == "1":
        loop.add_signal_handler(signal.SIGUSR2, _hang_for_tests)
    registry.ledger.idle_rss = process_rss()  # bound, watching, scanned, no model loaded yet
    background = [
        asyncio.ensure_future(server.serve()),
        asyncio.ensure_future(Upkeep(registry).run(settings.memory.check_seconds, report)),
        asyncio.ensure_future(notifier.keep_watchdog_fed()),
    ]
    # Bound and scanned: requests are answered from here on (ZeroMQ queues them until serve() reads).
    notifier.ready(describe())
    log.info("ready (pid %d, default model %s, memory from %s)", os.getpid(), registry.default_id(), monitor.source)
    exporter = MetricsExporter(settings, registry, engine.tenants, engine.started)
    _start_metrics_http(exporter)
    background.append(asyncio.ensure_future(exporter.run()))  # the first textfile now: every series from the start
    warm = asyncio.ensure_future(warm_start(registry))
    warm.add_done_callback(lambda _: report())
    background.append(warm)
    await asyncio.sleep(0)  # warm_start marks its first load "loading" before the status says so
    report()
    await stop.wait()
    phase = "stopping"
    notifier.stopping(describe())
    log.info("stopping: finishing requests in flight (up to %.0f s)", settings.drain_seconds)
    await server.drain(settings.drain_seconds)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)  # the exporter writes its last textfile
    exporter.stop()
    watcher.stop()
    await registry.close()
    registry.store.stop()
    registry.events.close()
    server.close()
    monitor.stop()
    log.info("stopped")
    return 0


def _start_metrics_http(exporter: MetricsExporter) -> None:
    """The optional HTTP endpoint: one that cannot bind is logged; embeddings are served anyway."""
    try:
        exporter.start_http()
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:  # the unit's RestrictAddressFamilies=AF_UNIX
            fix = "allow AF_INET and AF_INET6 in a drop-in (RestrictAddressFamilies=, see the unit's comments)"
        else:
            fix = "set metrics.http to a free port"
        log.error("metrics: cannot serve HTTP on %s (%s); %s", exporter.settings.http, exc, fix)


def _tegrastats(settings: Settings) -> str | None:
    """The tegrastats program to run, if any: found on PATH ("auto"), a path, or "off"."""
    choice = settings.memory.tegrastats
    if choice == "off":
        return None
    return shutil.which("tegrastats") if choice == "auto" else choice


def _reload(registry: Registry, watcher: CatalogWatcher, notifier: Notifier, describe: Callable[[], str]) -> None:
    """SIGHUP: rescan the catalog, bracketed by RELOADING=1 and READY=1 for systemd."""
    notifier.reloading()
    try:
        registry.scan()
        watcher.sync()
    finally:
        notifier.ready(describe())


def _hang_for_tests() -> None:
    """Test-only (see TEST_HANG_ENV): block the loop for good, as a deadlock would."""
    log.warning("SIGUSR2 with %s=1: hanging the event loop (test-only)", TEST_HANG_ENV)
    while True:
        time.sleep(3600)


def _on_stop_signal(stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second stop signal: exiting now")
        os._exit(1)
    stop.set()
