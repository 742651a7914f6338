"""asyncio client of the akidb-embed daemon: many concurrent calls over one DEALER socket.

One reader task receives every reply and hands it to the call awaiting that id; a call
that hears nothing within the timeout resends its request, then raises ``Unavailable``.
Use an AsyncClient from one event loop only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import zmq
import zmq.asyncio

from .client import Embeddings, embed_fields, model_of, reply_id, request_ids, resolve_socket, unavailable
from .errors import Unavailable
from .events import CONNECT_WAIT_MS, EventReader, deadline_after, events_path, stop_monitor, subscriber, wait_ms
from .protocol import Event, Reply, decode_reply, encode_request


class AsyncClient:
    """asyncio client; use as ``async with`` or await ``close()``.

    ``timeout`` and ``retries`` work as in ``Client``; ``load`` waits for the model to load,
    so give the client that loads a large model a larger timeout.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = 10.0, retries: int = 3,
                 expect_fingerprint: str | None = None) -> None:
        self.socket_path = resolve_socket(socket)
        self.expect_fingerprint = expect_fingerprint
        self.timeout = timeout
        self.retries = max(1, retries)
        self._ids = request_ids()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[list[bytes]]] = {}

    async def embed(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        normalize: bool | None = None,
        truncate: bool | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        keep_alive: float | None = None,
        constraints: dict[str, Any] | None = None,
        expect_fingerprint: str | None = None,
        allow_fallback: bool | None = None,
    ) -> Embeddings:
        """Embed one text or a list of texts; rows follow the input order. See ``Client.embed``."""
        fields = embed_fields(texts, model, normalize, truncate, prompt, dimensions, self.timeout, keep_alive,
                              constraints, expect_fingerprint or self.expect_fingerprint, allow_fallback)
        return Embeddings.from_reply(await self._call("embed", **fields))

    async def models(self) -> list[dict[str, Any]]:
        """Every model in the catalog with its state."""
        return (await self._call("models")).result["models"]

    async def fits(self, constraints: dict[str, Any]) -> dict[str, Any]:
        """The models that meet ``constraints`` and why the others do not. See ``Client.fits``."""
        return (await self._call("models", constraints=constraints)).result["fits"]

    async def load(self, model: str, keep_alive: float | None = None) -> dict[str, Any]:
        """Load a model and return its description once it is loaded. See ``Client.load``."""
        return model_of(await self._call("load", model=model, keep_alive=keep_alive))

    async def tune(self, model: str) -> dict[str, Any]:
        """Measure a model's memory and speed settings again and reload it. See ``Client.tune``."""
        return model_of(await self._call("tune", model=model))

    async def bench(self, model: str, texts: int | None = None) -> dict[str, Any]:
        """Measure a model's profile on the daemon's device. See ``Client.bench``."""
        return (await self._call("bench", model=model, texts=texts)).result["profile"]

    async def unload(self, model: str) -> dict[str, Any]:
        """Unload a model and return its description. See ``Client.unload``."""
        return model_of(await self._call("unload", model=model))

    async def pin(self, model: str) -> dict[str, Any]:
        """Pin a model and return its description. See ``Client.pin``."""
        return model_of(await self._call("pin", model=model))

    async def unpin(self, model: str) -> dict[str, Any]:
        """Unpin a model and return its description. See ``Client.unpin``."""
        return model_of(await self._call("unpin", model=model))

    async def status(self) -> dict[str, Any]:
        """The daemon's status."""
        return (await self._call("status")).result

    async def ping(self) -> dict[str, Any]:
        """A cheap round trip to check that the daemon answers."""
        return (await self._call("ping")).result

    async def events(
        self,
        models: Collection[str] | None = None,
        timeout: float | None = None,
        events_socket: str | os.PathLike[str] | None = None,
    ) -> AsyncIterator[Event]:
        """The daemon's lifecycle events as an async iterator, subscribed when the iteration starts.

        See ``Client.events``; here ``timeout`` ends the iterator (its socket closes).
        """
        socket, monitor = subscriber(zmq.asyncio.Context.instance(), events_path(self.socket_path, events_socket))
        reader = EventReader(models)
        try:
            await monitor.poll(CONNECT_WAIT_MS)
            stop_monitor(socket, monitor)
            deadline = deadline_after(timeout)
            while await socket.poll(wait_ms(deadline)):
                event = reader.read(await socket.recv_multipart())
                if event is not None:
                    yield event
                    deadline = deadline_after(timeout)
        finally:
            monitor.close(linger=0)  # not yet closed if cancelled while connecting
            socket.close(linger=0)

    async def close(self) -> None:
        """Stop the reader, close the socket and fail the calls still waiting."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"the client of {self.socket_path} was closed while waiting"))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, op: str, **fields: Any) -> Reply:
        """Send one request and await its reply, resending after each silent timeout."""
        socket = self._open()
        request_id = next(self._ids)
        frame = encode_request(op, request_id, **fields)
        future: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            for _ in range(self.retries):
                try:
                    frames = await asyncio.wait_for(self._attempt(socket, frame, future), self.timeout)
                except asyncio.TimeoutError:
                    continue
                return decode_reply(frames)
            raise unavailable(self.socket_path, self.retries, self.timeout, op)
        finally:
            del self._pending[request_id]

    @staticmethod
    async def _attempt(socket: zmq.asyncio.Socket, frame: bytes, future: asyncio.Future[list[bytes]]) -> list[bytes]:
        # The empty frame is the REQ-style delimiter the daemon's ROUTER expects and echoes.
        await socket.send_multipart([b"", frame])
        # Shielded so that a timed-out attempt leaves the future for the resend to await.
        return await asyncio.shield(future)

    def _open(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(f"ipc://{self.socket_path}")
            self._reader = asyncio.get_running_loop().create_task(self._read(self._socket))
        return self._socket

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        """Deliver each reply to the call awaiting its id; stale and duplicate replies are dropped."""
        while True:
            frames = await socket.recv_multipart()
            if len(frames) < 2 or frames[0] != b"":
                continue
            future = self._pending.get(reply_id(frames[1:]))
            if future is not None and not future.done():
                future.set_result(frames[1:])
