"""The ZeroMQ ROUTER sockets: receive, decode, dispatch, reply. The only thread on the sockets.

One ROUTER per tenant: the main socket, and one for each ``[[tenants]]`` table, whose file gets the
tenant's group and mode so the kernel decides who may connect. Each request carries its ``Caller``
(the socket's tenant and the client's identity) into the op. Requests arrive as ``[identity, b"", request]`` (REQ clients; DEALER clients send the empty
delimiter themselves). Cheap ops are answered inline; each op that waits (embed, load, pin,
unload, tune) becomes a task, so the loop never waits on tokenization, inference or a load. This module is also the one place where
exceptions become error replies: every request gets exactly one reply (dropped and counted, never
queued without bound, when its client is gone or does not read: backpressure.py).
"""

from __future__ import annotations

import asyncio
import grp
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
from .settings import Settings, Tenant
from .tenancy import Caller

log = logging.getLogger(__name__)



class BindError(RuntimeError):
    """A socket that cannot be set up; the message names the cause and the fix."""


class SocketInUse(BindError):
    """Another daemon answers on the socket path."""


class Server:
    """Owns the ROUTER sockets, one per tenant; runs ``Engine`` ops for each request."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.ops = engine.ops()
        if self.ops.keys() != protocol.OP_FIELDS.keys():  # a new op must be answered, never an internal error
            raise RuntimeError(f"ops without a handler or without a protocol entry: {self.ops.keys() ^ protocol.OP_FIELDS.keys()}")
        self.context = zmq.Context()
        self.tenants: dict[zmq.Socket, Tenant] = {
            self.context.socket(zmq.ROUTER): tenant for tenant in (engine.tenants.main, *settings.tenants)
        }
        self.replies = engine.replies
        self.tasks: set[asyncio.Task] = set()
        self.accepting = True

    def bind(self) -> None:
        """Bind each tenant's ``ipc://`` path with its group and mode (0660 for the main socket), replacing
        stale socket files."""
        for socket, tenant in self.tenants.items():
            path = tenant.socket
            path.parent.mkdir(parents=True, exist_ok=True)
            _claim(path)
            configure_router(socket, self.settings.limits)
            old_umask = os.umask(0o177)  # no window in which the socket is open to anyone but the daemon
            try:
                socket.bind(f"ipc://{path}")
            finally:
                os.umask(old_umask)
            _set_access(path, tenant)
            log.info("listening on ipc://%s (tenant %s)", path, tenant.name)

    async def serve(self) -> None:
        """Answer requests on every socket until cancelled."""
        # A plain socket read from the loop's own selector: a third faster per round trip than zmq.asyncio.
        loop = asyncio.get_running_loop()
        for socket in self.tenants:
            loop.add_reader(socket.getsockopt(zmq.FD), self._receive, socket)
        try:
            for socket in self.tenants:
                self._receive(socket)
            await asyncio.Event().wait()
        finally:
            for socket in self.tenants:
                loop.remove_reader(socket.getsockopt(zmq.FD))

    def _receive(self, socket: zmq.Socket) -> None:
        """Dispatch every waiting request: ZeroMQ's descriptor only signals changes, so drain it."""
        while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = socket.recv_multipart(zmq.NOBLOCK)
            try:
                self._dispatch(socket, frames)
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
        for socket, tenant in self.tenants.items():
            socket.close(linger=1000)  # let the last replies leave
            tenant.socket.unlink(missing_ok=True)
        self.context.term()

    def _dispatch(self, socket: zmq.Socket, frames: list[bytes]) -> None:
        envelope, body = _split_envelope(frames)
        caller = Caller(self.tenants[socket], envelope[0])
        request = None
        try:
            if len(body) != 1:
                raise BadRequest(f"a request is one msgpack frame, not {len(body)}; use a REQ or DEALER socket")
            if len(body[0]) > self.settings.limits.max_request_bytes:
                raise BadRequest(
                    f"the request is {len(body[0])} bytes; the limit is {self.settings.limits.max_request_bytes} "
                    "(limits.max_request_bytes): split the texts across requests"
                )
            self.replies.check(socket, envelope)
            request = protocol.decode_request(body[0])
            outcome = self.ops[request.op](request.fields, caller)
            if asyncio.iscoroutine(outcome):
                self._start(socket, envelope, request, outcome)
                return
            frames = protocol.encode_result(request.id, *outcome)
        except Exception as exc:
            # Refused before or while decoding: the id, if any, is found once, here.
            request_id = request.id if request else protocol.request_id_of(body[0]) if body else None
            frames = _error_frames(request_id, request.op if request else "request", exc)
        self._send(socket, envelope, frames)

    def _start(self, socket: zmq.Socket, envelope: list[bytes], request: protocol.Request, outcome: Coroutine) -> None:
        """Run an op that waits (on inference or a load) as a task of its own."""
        if not self.accepting:
            outcome.close()
            raise ShuttingDown("the daemon is shutting down; retry in a moment")
        task = asyncio.ensure_future(self._answer(socket, envelope, request, outcome))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, socket: zmq.Socket, envelope: list[bytes], request: protocol.Request, outcome: Coroutine) -> None:
        try:
            frames = protocol.encode_result(request.id, *await outcome)
        except (Exception, asyncio.CancelledError) as exc:
            frames = _error_frames(request.id, request.op, exc)
        self._send(socket, envelope, frames)
        self._receive(socket)  # a send can swallow the descriptor's signal for requests that came meanwhile

    def _send(self, socket: zmq.Socket, envelope: list[bytes], frames: list) -> None:
        # Never blocks: a reply to a vanished or non-reading client is dropped and counted.
        self.replies.send(socket, envelope, frames)


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


def _set_access(path: Path, tenant: Tenant) -> None:
    """The socket file's group and mode: connecting needs write access, so the kernel enforces who may."""
    if tenant.group is not None:
        try:
            os.chown(path, -1, grp.getgrnam(tenant.group).gr_gid)
        except (KeyError, OSError) as exc:
            path.unlink(missing_ok=True)
            raise BindError(
                f"cannot give {path} to group {tenant.group!r} (tenants.{tenant.name}.group): {exc}; create the group "
                "and make the daemon's user a member of it (SupplementaryGroups= in the unit), or fix the name"
            ) from None
    os.chmod(path, tenant.mode)


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
