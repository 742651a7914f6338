"""Blocking client of the akidb-embed daemon: Lazy Pirate request-reply over a REQ socket.

A ``Client`` is not thread-safe (ZeroMQ sockets are not): use one Client per thread.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from .errors import InternalError, Unavailable
from .events import EventStream, events_path
from .protocol import AUTO_MODEL, Reply, decode_reply, encode_request

DEFAULT_SOCKET = "/run/akidb-embed/embed.sock"
SOCKET_ENV = "AKIDB_EMBED_SOCKET"


def resolve_socket(socket: str | os.PathLike[str] | None) -> str:
    """The socket path: the argument, else ``$AKIDB_EMBED_SOCKET``, else the default."""
    if socket is not None:
        return os.fspath(socket)
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class Embeddings(np.ndarray):
    """float32 vectors of shape (n, dim), in input order, with the reply's model metadata."""

    model: str | None
    fingerprint: str | None
    dimension: int | None
    tokens: list[int] | None
    auto: dict[str, Any] | None  # model "auto": the prompt and dimensions it chose, judged on "profile" or "manifest"
    fallback: dict[str, Any] | None  # a fallback served: the model requested, and the error code and message why

    _META = ("model", "fingerprint", "dimension", "tokens", "auto", "fallback")

    @classmethod
    def from_reply(cls, reply: Reply) -> Embeddings:
        """Wrap an embed reply; the vectors are copied so the array is writable."""
        if reply.vectors is None:
            raise InternalError("the embed reply has no vector frame; the daemon and client disagree on the protocol")
        out = reply.vectors.astype(np.float32).view(cls)
        out.model = reply.result.get("model")
        out.fingerprint = reply.result.get("fingerprint")
        out.dimension = reply.result.get("dim")
        out.tokens = reply.result.get("tokens")
        out.auto = reply.result.get("auto")
        out.fallback = reply.result.get("fallback")
        return out

    def __array_finalize__(self, obj: Any) -> None:
        """Carry the metadata over to views and slices."""
        for name in self._META:
            setattr(self, name, getattr(obj, name, None))


def embed_fields(
    texts: str | Sequence[str],
    model: str | None,
    normalize: bool | None,
    truncate: bool | None,
    prompt: str | None,
    dimensions: int | None,
    timeout: float,
    keep_alive: float | None = None,
    constraints: dict[str, Any] | None = None,
    expect_fingerprint: str | None = None,
    allow_fallback: bool | None = None,
) -> dict[str, Any]:
    """The fields of an embed request; a single string is a list of one. ``constraints`` without a model mean
    ``model="auto"``."""
    return {
        "texts": [texts] if isinstance(texts, str) else list(texts),
        "model": AUTO_MODEL if model is None and constraints is not None else model,
        "normalize": normalize,
        "truncate": truncate,
        "prompt": prompt,
        "dimensions": dimensions,
        # The daemon drops work whose caller has given up waiting for this attempt. It counts
        # from its receipt of the request, a cold load included: past it, the request is
        # answered overloaded instead of being run.
        "timeout_ms": max(1, round(timeout * 1000)),
        "keep_alive": keep_alive,
        "constraints": constraints,
        "expect_fingerprint": expect_fingerprint,
        "allow_fallback": allow_fallback,
    }


def model_of(reply: Reply) -> dict[str, Any]:
    """The model description in a ``load``/``unload``/``pin``/``unpin`` reply."""
    model = reply.result.get("model")
    if not isinstance(model, dict):
        raise InternalError("the reply has no model description; the daemon and client disagree on the protocol")
    return model


def reply_id(frames: list[bytes]) -> str | int | None:
    """The id in a reply header, or None when the header or its id is unusable."""
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except Exception:  # msgpack raises several unrelated types for garbage
        return None
    found = header.get("id") if isinstance(header, dict) else None
    return found if isinstance(found, (str, int)) else None


def request_ids() -> Iterator[str]:
    """Ids unique across clients (random prefix) and within one (counter)."""
    prefix = uuid.uuid4().hex[:12]
    return (f"{prefix}-{n}" for n in itertools.count(1))


def unavailable(path: str, tries: int, timeout: float, op: str | None = None) -> Unavailable:
    """The error for a daemon that never answered, naming the socket and the likely fixes."""
    missing = "" if os.path.exists(path) else " (the socket file does not exist)"
    slow = (
        "loading a large model can take longer than the timeout: pass a larger timeout to the client; "
        if op == "load" and not missing
        else ""
    )
    return Unavailable(
        f"no reply from the akidb-embed daemon at {path}{missing} after {tries} tries of {timeout:g} s each; {slow}"
        "is the daemon running (systemctl status akidb-embed)? can this user open the socket "
        f"(is it in the akidb-embed group)? set {SOCKET_ENV} or pass the socket path if it lives elsewhere"
    )


class Client:
    """Blocking client; one per thread. Use as a context manager or call ``close()``.

    ``timeout`` is the seconds to wait for each of the ``retries`` tries of a call. An ``embed``
    also sends it as ``timeout_ms``, which the daemon counts from its receipt, a cold load
    included. ``load`` answers only once the model is loaded, which can take minutes for a
    large model: give the client that loads it a larger timeout, e.g. ``Client(timeout=300)``.
    ``expect_fingerprint`` pins every ``embed`` of this client to one model version (see ``embed``).
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = 10.0, retries: int = 3,
                 expect_fingerprint: str | None = None) -> None:
        self.socket_path = resolve_socket(socket)
        self.expect_fingerprint = expect_fingerprint
        self.timeout = timeout
        self.retries = max(1, retries)
        self._ids = request_ids()
        self._socket: zmq.Socket | None = None

    def embed(
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
        """Embed one text or a list of texts; rows follow the input order.

        ``keep_alive`` is the seconds the model stays loaded after this request: negative
        (``KEEP_ALIVE_FOREVER``) keeps it loaded, 0 unloads it at once, None is the default.
        ``constraints`` (model "auto", or no model): the daemon chooses the model, e.g.
        ``{"max_latency_ms": 5, "languages": ["de", "en"], "task": "query"}`` (docs/protocol.md).
        ``expect_fingerprint`` (else the client's): ``ModelChanged`` instead of vectors from another model version.
        ``allow_fallback``: a model that failed, is overloaded or does not fit may be served by its manifest's
        fallback of the same width; the result's ``fallback`` then says so.
        """
        fields = embed_fields(texts, model, normalize, truncate, prompt, dimensions, self.timeout, keep_alive,
                              constraints, expect_fingerprint or self.expect_fingerprint, allow_fallback)
        return Embeddings.from_reply(self._call("embed", **fields))

    def models(self) -> list[dict[str, Any]]:
        """Every model in the catalog with its state."""
        return self._call("models").result["models"]

    def fits(self, constraints: dict[str, Any]) -> dict[str, Any]:
        """The models that meet ``constraints``, best first (the first is what model "auto" would get now), and
        the others with the constraint each failed: ``{"fitting": [...], "rejected": [...]}``."""
        return self._call("models", constraints=constraints).result["fits"]

    def load(self, model: str, keep_alive: float | None = None) -> dict[str, Any]:
        """Load a model (a loaded one is not loaded again) and return its description once it is loaded.

        See the class doc on timeouts.
        """
        return model_of(self._call("load", model=model, keep_alive=keep_alive))

    def unload(self, model: str) -> dict[str, Any]:
        """Unload a model (it loads again on its next use) and return its description."""
        return model_of(self._call("unload", model=model))

    def pin(self, model: str) -> dict[str, Any]:
        """Pin a model: the daemon no longer unloads it on its own (idle keep-alive, eviction)."""
        return model_of(self._call("pin", model=model))

    def unpin(self, model: str) -> dict[str, Any]:
        """Undo ``pin``: the model's keep-alive and eviction apply again."""
        return model_of(self._call("unpin", model=model))

    def tune(self, model: str) -> dict[str, Any]:
        """Measure the model's memory and speed settings again on this machine, reload it with them, return its description.

        A loaded model keeps serving until the new copy swaps in; one that is not loaded is loaded first, then measured.
        """
        return model_of(self._call("tune", model=model))

    def bench(self, model: str, texts: int | None = None) -> dict[str, Any]:
        """Measure a model's profile on the daemon's device (loading it if need be): cold load, single-text p50/p95
        over ``texts`` requests, throughput at its tuned batch, memory and self-test quality. Returns the profile; the
        model's ``models`` entry shows it from then on. Takes seconds: give the client a timeout to match."""
        return self._call("bench", model=model, texts=texts).result["profile"]

    def status(self) -> dict[str, Any]:
        """The daemon's status."""
        return self._call("status").result

    def ping(self) -> dict[str, Any]:
        """A cheap round trip to check that the daemon answers."""
        return self._call("ping").result

    def events(
        self,
        models: Collection[str] | None = None,
        timeout: float | None = None,
        events_socket: str | os.PathLike[str] | None = None,
    ) -> EventStream:
        """Iterate over the daemon's lifecycle events (docs/protocol.md), connected once this returns.

        ``models`` keeps only those models' events; ``timeout`` stops an iteration after that many
        seconds without one (None: never; see ``EventStream``). After a daemon restart the stream goes on by itself,
        and the new daemon's first event seen has ``restarted`` set. ``events_socket`` overrides the
        path beside the request socket. Events before the call are not seen: read ``models()`` after it.
        """
        return EventStream(events_path(self.socket_path, events_socket), models, timeout)

    def close(self) -> None:
        """Close the socket; queued requests are dropped."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: str, **fields: Any) -> Reply:
        """Send one request, resending on a fresh socket when no matching reply comes in time."""
        request_id = next(self._ids)
        frame = encode_request(op, request_id, **fields)
        for _ in range(self.retries):
            frames = self._attempt(frame)
            if frames is not None and reply_id(frames) == request_id:
                return decode_reply(frames)
            # No reply, or one to another request: a REQ socket cannot wait again, so start
            # over on a new socket (new identity) that stale replies can no longer reach.
            self.close()
        raise unavailable(self.socket_path, self.retries, self.timeout, op)

    def _attempt(self, frame: bytes) -> list[bytes] | None:
        """One send and wait; None when nothing came back within the timeout."""
        socket = self._open()
        try:
            socket.send(frame)
            if socket.poll(self.timeout * 1000, zmq.POLLIN):
                return socket.recv_multipart()
        except BaseException:
            # An interrupted REQ socket is stuck waiting for a reply; the next call needs a fresh one.
            self.close()
            raise
        return None

    def _open(self) -> zmq.Socket:
        if self._socket is None:
            self._socket = zmq.Context.instance().socket(zmq.REQ)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(f"ipc://{self.socket_path}")
        return self._socket
