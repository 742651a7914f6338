"""Subscribing to the daemon's lifecycle events: the SUB socket, and the reading of its stream.

``Client.events()`` and ``AsyncClient.events()`` build on these. The SUB socket takes every
event (the topics cannot name a model) so that ``seq`` shows every loss; the model filter
applies after decoding. ZeroMQ reconnects it by itself when the daemon restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Collection, Iterator

import zmq

from .protocol import Event, decode_event, events_socket_path

RECONNECT_MS = 100  # first retry after the daemon went away...
RECONNECT_MAX_MS = 1000  # ...backing off to once a second while it stays away
CONNECT_WAIT_MS = 1000  # how long opening waits for the daemon; it connects later if the daemon is not up


def events_path(socket_path: str, events_socket: str | os.PathLike[str] | None) -> str:
    """The events socket: the one named, else the one beside the request socket."""
    return os.fspath(events_socket if events_socket is not None else events_socket_path(socket_path))


def subscriber(context: zmq.Context, path: str) -> tuple[zmq.Socket, zmq.Socket]:
    """A SUB socket connecting to ``path``, and a monitor socket that becomes readable once it is connected."""
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    # Watched before connecting, so the handshake cannot pass unseen.
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    socket.connect(f"ipc://{path}")
    return socket, monitor


def stop_monitor(socket: zmq.Socket, monitor: zmq.Socket) -> None:
    """Done waiting for the connection: reconnects need no watching."""
    socket.disable_monitor()
    monitor.close(linger=0)


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic time a wait of ``timeout`` seconds ends; None: never."""
    return None if timeout is None else time.monotonic() + timeout


def wait_ms(deadline: float | None) -> int | None:
    """Milliseconds left until ``deadline`` for a poll; None polls without end."""
    return None if deadline is None else max(0, round((deadline - time.monotonic()) * 1000))


class EventReader:
    """Decodes the stream, marks restarts and losses, and keeps the wanted models' events."""

    def __init__(self, models: Collection[str] | None) -> None:
        self.models = None if models is None else frozenset(models)
        self._last: Event | None = None
        # Told on the next event kept: a restart or a loss seen on one the filter left out still counts.
        self._restarted, self._missed = False, 0

    def read(self, frames: list[bytes]) -> Event | None:
        """The event in ``frames``, or None when the filter leaves it out."""
        event = decode_event(frames)
        last, self._last = self._last, event
        if last is not None and event.started != last.started:
            # The new daemon's events before this one came while the socket reconnected.
            self._restarted, self._missed = True, self._missed + event.seq - 1
        elif last is not None:
            self._missed += max(0, event.seq - last.seq - 1)
        if self.models is not None and event.model not in self.models:
            return None
        event = dataclasses.replace(event, restarted=self._restarted, missed=self._missed)
        self._restarted, self._missed = False, 0
        return event


class EventStream(Iterator[Event], contextlib.AbstractContextManager):
    """The blocking iterator ``Client.events()`` returns; connected (if the daemon is up) once built.

    An iteration stops after ``timeout`` seconds without a wanted event (None: never), but the stream stays
    subscribed: iterating again goes on from there, as a file does after more is written (``timeout=0``
    takes what has come). ``close()`` it, or use it as a context manager, to unsubscribe.
    """

    def __init__(self, path: str, models: Collection[str] | None, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout
        self._reader = EventReader(models)
        self._socket, monitor = subscriber(zmq.Context.instance(), path)
        monitor.poll(CONNECT_WAIT_MS)
        stop_monitor(self._socket, monitor)

    def __next__(self) -> Event:
        deadline = deadline_after(self.timeout)
        while self._socket is not None and self._socket.poll(wait_ms(deadline)):
            event = self._reader.read(self._socket.recv_multipart())
            if event is not None:
                return event
        raise StopIteration

    def close(self) -> None:
        """Unsubscribe; iterating again stops at once."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __exit__(self, *exc: object) -> None:
        self.close()
