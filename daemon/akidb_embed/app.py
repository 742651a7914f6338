"""Daemon lifecycle: build the parts in order, bind, serve, and tear down in reverse.

Signal handlers only set flags or schedule work on the loop: SIGTERM/SIGINT stop it (a second
one exits at once), SIGHUP rescans the catalog. Readiness comes first; previously warm and
pinned models reload in the background afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal

from .engine import Engine
from .loader import use_one_malloc_arena
from .memory import MemoryMonitor
from .registry import Registry
from .server import Server
from .settings import Settings
from .state import StateStore
from .watcher import CatalogWatcher, model_directories

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; the process exit code."""
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    use_one_malloc_arena()
    loop = asyncio.get_running_loop()
    monitor = MemoryMonitor(_tegrastats(settings), settings.memory.tegrastats_interval_ms)
    monitor.start()
    registry = Registry(settings, monitor, StateStore(settings.state_dir))
    watcher = CatalogWatcher(
        settings.catalog,
        registry.scan,
        loop,
        extra_directories=lambda: model_directories(e.manifest for e in registry.entries.values() if e.manifest),
    )
    watcher.start()  # before the first scan: nothing written in between is missed
    registry.scan()
    watcher.sync()  # the model directories are known once the manifests are
    server = Server(settings, Engine(settings, registry))
    server.bind()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_stop_signal, stop)
    loop.add_signal_handler(signal.SIGHUP, _rescan, registry, watcher)
    background = [
        asyncio.ensure_future(server.serve()),
        asyncio.ensure_future(_maintain(registry, settings.memory.check_seconds)),
    ]
    log.info("ready (pid %d, default model %s, memory from %s)", os.getpid(), registry.default_id(), monitor.source)
    background.append(asyncio.ensure_future(registry.warm_start()))
    await stop.wait()
    log.info("stopping: finishing requests in flight (up to %.0f s)", settings.drain_seconds)
    await server.drain(settings.drain_seconds)
    for task in background:
        task.cancel()
    watcher.stop()
    await registry.close()
    server.close()
    monitor.stop()
    log.info("stopped")
    return 0


async def _maintain(registry: Registry, every: float) -> None:
    """keep_alive expiry and memory-pressure eviction, every few seconds."""
    while True:
        await asyncio.sleep(every)
        try:
            await registry.maintain()
        except Exception:  # housekeeping must outlive one bad round
            log.exception("memory housekeeping failed")


def _tegrastats(settings: Settings) -> str | None:
    """The tegrastats program to run, if any: found on PATH ("auto"), a path, or "off"."""
    choice = settings.memory.tegrastats
    if choice == "off":
        return None
    return shutil.which("tegrastats") if choice == "auto" else choice


def _rescan(registry: Registry, watcher: CatalogWatcher) -> None:
    registry.scan()
    watcher.sync()


def _on_stop_signal(stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second stop signal: exiting now")
        os._exit(1)
    stop.set()
