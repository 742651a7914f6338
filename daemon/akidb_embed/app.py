"""Daemon lifecycle: build the parts in order, bind, serve, and tear down in reverse.

Signal handlers only set flags or schedule work on the loop: SIGTERM/SIGINT stop it (a second
one exits at once), SIGHUP rescans the catalog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from .engine import Engine
from .registry import Registry
from .server import Server
from .settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; the process exit code."""
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    registry = Registry(settings)
    registry.scan()
    engine = Engine(settings, registry)
    server = Server(settings, engine)
    server.bind()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_stop_signal, stop)
    loop.add_signal_handler(signal.SIGHUP, registry.scan)
    serving = asyncio.ensure_future(server.serve())
    log.info("ready (pid %d, default model %s)", os.getpid(), registry.default_id())
    await stop.wait()
    log.info("stopping: finishing requests in flight (up to %.0f s)", settings.drain_seconds)
    await server.drain(settings.drain_seconds)
    serving.cancel()
    await registry.close()
    server.close()
    log.info("stopped")
    return 0


def _on_stop_signal(stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second stop signal: exiting now")
        os._exit(1)
    stop.set()
