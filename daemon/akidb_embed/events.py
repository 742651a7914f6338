"""Lifecycle events on a ZeroMQ PUB socket beside the request socket, for apps that must know when a model changes.

Each event is two frames: the topic (``model.<event>`` or ``memory.<event>``, so a subscriber
can filter by prefix) and a msgpack map with ``v``, a ``seq`` that rises by one per event (a gap
means the subscriber missed some), ``time`` (Unix seconds), ``started`` (this daemon's start: a
new value means a restarted daemon, whose seq begins at 1 again), ``event`` and its fields,
``model`` first for model events; ``protocol.encode_event`` packs them. docs/protocol.md lists every event. Published from the event-loop thread
only; a PUB socket never blocks: a subscriber too slow to read loses events past its high-water
mark, never the daemon's time.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq
from akidb_embed_client.protocol import encode_event

log = logging.getLogger(__name__)

MODEL_EVENTS = ("discovered", "loaded", "unloaded", "evicted", "swapped", "failed", "removed",
                "circuit_opened", "circuit_closed")  # fmt: skip
MEMORY_EVENTS = ("pressure_high", "pressure_normal")
SOCKET_MODE = 0o660  # as the request socket: the same group may listen
SEND_HWM = 10_000  # events queued per subscriber before it loses the oldest


class EventPublisher:
    """The PUB socket; ``publish`` one event. Without ``bind`` (tests of the parts) events go nowhere."""

    def __init__(self) -> None:
        self.socket: zmq.Socket | None = None
        self.path: Path | None = None
        self.seq = 0
        self.started = time.time()

    def bind(self, path: Path, context: zmq.Context) -> None:
        """Bind ``ipc://path`` with mode 0660, replacing a stale socket file (the request socket's claim went first)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        socket = context.socket(zmq.PUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        old_umask = os.umask(0o117)
        try:
            socket.bind(f"ipc://{path}")
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        self.socket, self.path = socket, path
        log.info("events on ipc://%s", path)

    def model(self, event: str, model_id: str, **fields: Any) -> None:
        """A model's event (one of MODEL_EVENTS)."""
        self._publish("model", event, {"model": model_id, **fields})

    def memory(self, event: str, **fields: Any) -> None:
        """A memory event (one of MEMORY_EVENTS)."""
        self._publish("memory", event, fields)

    def _publish(self, kind: str, event: str, fields: dict[str, Any]) -> None:
        self.seq += 1
        if self.socket is None:
            return
        frames = encode_event(kind, event, self.seq, self.started, time.time(), fields)
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # an event lost is logged; serving goes on
            log.warning("event %s.%s not published: %s", kind, event, exc)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=200)
            self.path.unlink(missing_ok=True)
            self.socket = None
