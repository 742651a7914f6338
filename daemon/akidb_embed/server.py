"""The ZeroMQ ROUTER socket: receive, decode, dispatch, reply. The only thread on the socket.

Requests arrive as ``[identity, b"", request]`` (REQ clients; DEALER clients send the empty
delimiter themselves). Cheap ops are answered inline; each op that waits (embed, load, pin,
unload, tune) becomes a task, so the loop never waits on tokenization, inference or a load. This module is also the one place where
exceptions become error replies: every request gets exactly one reply (dropped and counted, never
queued without bound, when its client is gone or does not read: backpressure.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any
from pathlib import Path

import zmq
from akidb_embed_client import protocol
from akidb_embed_client.errors import BadRequest, EmbedError, InternalError, ShuttingDown

from .backpressure import configure_router
from .engine import Engine
from .settings import Settings

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


class SocketInUse(RuntimeError):
    """Another daemon answers on the socket path."""


class Server:
    """Owns the ROUTER socket; runs ``Engine`` ops for each request."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.ops = engine.ops()
        if self.ops.keys() != protocol.OP_FIELDS.keys():  # a new op must be answered, never an internal error
            raise RuntimeError(f"ops without a handler or without a protocol entry: {self.ops.keys() ^ protocol.OP_FIELDS.keys()}")
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.replies = engine.replies
        self.tasks: set[asyncio.Task] = set()
        self.accepting = True

    def bind(self) -> None:
        """Bind ``ipc://`` at the socket path with mode 0660, replacing a stale socket file."""
        path = self.settings.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        _claim(path)
        configure_router(self.socket, self.settings.limits)
        old_umask = os.umask(0o117)  # no window in which the socket is world-accessible
        try:
            self.socket.bind(f"ipc://{path}")
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        log.info("listening on ipc://%s", path)

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        # A plain socket read from the loop's own selector: a third faster per round trip than zmq.asyncio.
        loop = asyncio.get_running_loop()
        loop.add_reader(self.socket.getsockopt(zmq.FD), self._receive)
        try:
            self._receive()
            await asyncio.Event().wait()
        finally:
            loop.remove_reader(self.socket.getsockopt(zmq.FD))

    def _receive(self) -> None:
        """Dispatch every waiting request: ZeroMQ's descriptor only signals changes, so drain it."""
        while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
            try:
                self._dispatch(frames)
            except Exception:  # no request, however malformed, may end the loop
                log.exception("a request could not be answered")

    async def drain(self, grace: float) -> None:
        """Refuse new embeds, give those in flight ``grace`` seconds, then answer the rest with an error."""
        self.accepting = False
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)

    def close(self) -> None:
        self.socket.close(linger=1000)  # let the last replies leave
        self.context.term()
        self.settings.socket.unlink(missing_ok=True)

    def _dispatch(self, frames: list[bytes]) -> None:
        envelope, body = _split_envelope(frames)
        request = None
        try:
            if len(body) != 1:
                raise BadRequest(f"a request is one msgpack frame, not {len(body)}; use a REQ or DEALER socket")
            if len(body[0]) > self.settings.limits.max_request_bytes:
                raise BadRequest(
                    f"the request is {len(body[0])} bytes; the limit is {self.settings.limits.max_request_bytes} "
                    "(limits.max_request_bytes): split the texts across requests"
                )
            self.replies.check(envelope)
            request = protocol.decode_request(body[0])
            outcome = self.ops[request.op](request.fields)
            if asyncio.iscoroutine(outcome):
                self._start(envelope, request, outcome)
                return
            frames = protocol.encode_result(request.id, *outcome)
        except Exception as exc:
            # Refused before or while decoding: the id, if any, is found once, here.
            request_id = request.id if request else protocol.request_id_of(body[0]) if body else None
            frames = _error_frames(request_id, request.op if request else "request", exc)
        self._send(envelope, frames)

    def _start(self, envelope: list[bytes], request: protocol.Request, outcome: Coroutine) -> None:
        """Run an op that waits (on inference or a load) as a task of its own."""
        if not self.accepting:
            outcome.close()
            raise ShuttingDown("the daemon is shutting down; retry in a moment")
        task = asyncio.ensure_future(self._answer(envelope, request, outcome))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, envelope: list[bytes], request: protocol.Request, outcome: Coroutine) -> None:
        try:
            frames = protocol.encode_result(request.id, *await outcome)
        except (Exception, asyncio.CancelledError) as exc:
            frames = _error_frames(request.id, request.op, exc)
        self._send(envelope, frames)
        self._receive()  # a send can swallow the descriptor's signal for requests that came meanwhile

    def _send(self, envelope: list[bytes], frames: list) -> None:
        # Never blocks: a reply to a vanished or non-reading client is dropped and counted.
        self.replies.send(self.socket, envelope, frames)


def _error_frames(request_id: Any, op: str, exc: BaseException) -> list:
    """The one place an exception becomes an error reply: its own code, or shutting_down, or internal."""
    if isinstance(exc, EmbedError):
        error = exc
    elif isinstance(exc, asyncio.CancelledError):  # the drain at shutdown cancelled it
        error = ShuttingDown("the daemon stopped before this request finished; retry")
    else:
        log.error("%s request %r failed", op, request_id, exc_info=exc)
        error = InternalError(f"internal error: {exc}")
    return protocol.encode_error(request_id, error)


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Routing frames up to the empty delimiter, and the body after it."""
    for i, frame in enumerate(frames):
        if not frame:
            return frames[: i + 1], frames[i + 1 :]
    return frames[:1], frames[1:]


def _claim(path: Path) -> None:
    """Remove a stale socket file, or refuse if a live daemon answers on it."""
    if not path.exists():
        return
    context = zmq.Context.instance()
    probe = context.socket(zmq.REQ)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.connect(f"ipc://{path}")
        probe.send(protocol.encode_request("ping", "claim"))
        if probe.poll(300):
            raise SocketInUse(f"another akidb-embed answers on {path}; stop it or choose another --socket")
    finally:
        probe.close()
    path.unlink()
