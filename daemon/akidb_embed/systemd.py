"""systemd's notify protocol (sd_notify) over ``sdnotify``: readiness, reload, stop, status, watchdog.

Without ``NOTIFY_SOCKET`` (a foreground run) every call does nothing. The watchdog pings come
from a task on the serving loop itself, so a hung loop stops them and systemd restarts us.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import sdnotify

log = logging.getLogger(__name__)
# A send never holds the loop longer than this (systemd drains its queue; a full one drops the message).
SEND_TIMEOUT = 0.5
# How "systemctl status" orders the model states; the rest follow alphabetically.
STATE_ORDER = ("ready", "loading", "available", "failed", "invalid", "disabled")


class Notifier:
    """Messages to the service manager; a no-op when not started by one."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or None  # sdnotify reads it from there too
        self._watchdog = _watchdog_seconds(os.environ)
        self._last_status: str | None = None
        self._notifier: sdnotify.SystemdNotifier | None = None
        if self.address:
            try:
                self._notifier = sdnotify.SystemdNotifier(debug=True)
                self._notifier.socket.settimeout(SEND_TIMEOUT)
            except OSError as exc:
                log.warning("cannot reach systemd at NOTIFY_SOCKET=%s: %s", self.address, exc)

    @property
    def active(self) -> bool:
        return self._notifier is not None

    def ready(self, status: str | None = None) -> None:
        """Serving: the socket is bound and the catalog scanned (again, after a reload)."""
        self._send("READY=1", status)

    def reloading(self) -> None:
        """A SIGHUP rescan begins; ``ready()`` ends it."""
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}", "reloading: rescanning the catalog")

    def stopping(self, status: str | None = None) -> None:
        self._send("STOPPING=1", status)

    def status(self, text: str) -> None:
        """The line ``systemctl status`` shows; sent only when it changed."""
        self._send(None, text)

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None when systemd watches no one here."""
        return self._watchdog / 2 if self._watchdog and self.active else None

    def ping(self) -> None:
        self._send("WATCHDOG=1")

    async def keep_watchdog_fed(self) -> None:
        """Ping every ``watchdog_interval()`` until cancelled; run it on the loop that serves."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.ping()
            await asyncio.sleep(interval)

    def _send(self, message: str | None, status: str | None = None) -> None:
        if self._notifier is None:
            return
        lines = [message] if message else []
        if status is not None and status != self._last_status:
            lines.append(f"STATUS={status}")
        if not lines:
            return
        try:
            self._notifier.notify("\n".join(lines))
        except OSError as exc:  # systemd gone or its queue full: serving matters more than telling
            log.debug("sd_notify %r not sent: %s", lines[0], exc)
            return
        if status is not None:
            self._last_status = status


def status_line(figures: dict[str, Any], phase: str = "serving") -> str:
    """A person's summary of ``Engine.status()``: models by state, memory, requests in flight."""
    states: dict[str, int] = figures["models"]
    order = [s for s in STATE_ORDER if s in states] + sorted(set(states) - set(STATE_ORDER))
    ready = states.get("ready", 0)
    counts = [f"{ready} model{'' if ready == 1 else 's'} ready"] + [f"{states[s]} {s}" for s in order if s != "ready"]
    if not states:
        counts = ["no models in the catalog"]
    memory = figures["memory"]
    return f"{phase}: {', '.join(counts)}; memory {memory['pressure']:.0%} used ({memory['source']}); {figures['in_flight']} in flight"


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC in seconds when it is meant for this process (WATCHDOG_PID, if set, is ours)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        pid = int(environ.get("WATCHDOG_PID") or os.getpid())
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 and pid == os.getpid() else None
