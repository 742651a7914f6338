"""Wire protocol v1 of akidb-embed, stated once and imported by the daemon and the client.

A request is one msgpack frame: a map with the protocol version ``v``, a request ``id``
(str or int, echoed back), an ``op`` and that op's fields. A reply is a msgpack header
frame (``v``, ``id``, ``ok``, then the result or ``code``/``message``); an ``embed`` reply
adds a second frame holding the vectors as raw little-endian float32, row-major, of the
header's ``shape``. Lifecycle events come on a second socket (``events_socket_path``) as two
frames: a topic and a msgpack map. docs/protocol.md describes every field.
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .errors import BadRequest, EmbedError, InternalError, UnsupportedVersion, error_for

VERSION = 1
VECTOR_DTYPE = np.dtype("<f4")
MAX_ID_LENGTH = 128

_NONE = type(None)
# Each op's fields and the types they may have; fields not listed are refused.
OP_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "embed": {
        "texts": (list,),
        "model": (str, _NONE),
        "normalize": (bool, _NONE),
        "truncate": (bool, _NONE),
        "prompt": (str, _NONE),
        "dimensions": (int, _NONE),
        "timeout_ms": (int, _NONE),
        "keep_alive": (int, float, _NONE),
        "constraints": (dict, _NONE),  # with model "auto": what the chosen model must meet (docs/protocol.md)
        "expect_fingerprint": (str, _NONE),  # model_changed if another version serves
        "allow_fallback": (bool, _NONE),  # a failed, overloaded or full model may be served by its fallback
    },
    "models": {"constraints": (dict, _NONE)},
    "status": {},
    "ping": {},
    "load": {"model": (str,), "keep_alive": (int, float, _NONE)},
    "unload": {"model": (str,)},
    "pin": {"model": (str,)},
    "unpin": {"model": (str,)},
    "tune": {"model": (str,)},
    "bench": {"model": (str,), "texts": (int, _NONE)},
}
AUTO_MODEL = "auto"  # the model name that asks the daemon to choose by the request's constraints
# Seconds a model stays loaded after its last use: negative keeps it loaded, 0 unloads it at once.
KEEP_ALIVE_FOREVER = -1
REQUIRED_FIELDS = {"embed": ("texts",), "load": ("model",), "unload": ("model",), "pin": ("model",), "unpin": ("model",),
                   "tune": ("model",), "bench": ("model",)}


@dataclass(frozen=True)
class Request:
    """A decoded, type-checked request."""

    id: str | int
    op: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """A decoded successful reply; ``vectors`` is set for ``embed``."""

    id: str | int | None
    result: dict[str, Any]
    vectors: np.ndarray | None = None


def encode_request(op: str, request_id: str | int, **fields: Any) -> bytes:
    """Pack one request frame; fields that are None are left out."""
    body = {"v": VERSION, "id": request_id, "op": op}
    body.update({k: v for k, v in fields.items() if v is not None})
    return msgpack.packb(body, use_bin_type=True)


def decode_request(frame: bytes) -> Request:
    """Unpack and type-check a request frame; raises an EmbedError naming the problem.

    Invalid UTF-8 in a string becomes lone surrogates here so that the request id
    survives and the reply can say which text is broken.
    """
    try:
        body = msgpack.unpackb(frame, raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise BadRequest(f"the request is not valid msgpack ({exc}); send one msgpack map per request") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request is a msgpack {type(body).__name__}, not a map; send a map with v, id and op")
    request_id = _request_id(body)
    version = body.get("v")
    if type(version) is not int or version != VERSION:
        raise UnsupportedVersion(f"protocol version {brief(version)} is not supported; this daemon speaks v{VERSION}")
    op = body.get("op")
    if not isinstance(op, str) or op not in OP_FIELDS:
        raise BadRequest(f"unknown op {brief(op)}; known ops: {', '.join(OP_FIELDS)}")
    fields = {k: v for k, v in body.items() if k not in ("v", "id", "op")}
    _check_fields(op, fields)
    return Request(request_id, op, fields)


def request_id_of(frame: bytes) -> str | int | None:
    """Best-effort id of a request that failed to decode, so its error reply can carry it."""
    try:
        body = msgpack.unpackb(frame, raw=False, unicode_errors="surrogateescape", strict_map_key=False)
        return _request_id(body) if isinstance(body, dict) else None
    except Exception:  # any id that could not be echoed back safely
        return None


def _request_id(body: dict) -> str | int:
    request_id = body.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise BadRequest("the request has no id; set id to a string or an integer")
    if isinstance(request_id, str) and len(request_id) > MAX_ID_LENGTH:
        raise BadRequest(f"the request id is longer than {MAX_ID_LENGTH} characters")
    if isinstance(request_id, str) and not is_utf8(request_id):
        raise BadRequest("the request id is not valid UTF-8")
    return request_id


def brief(value: Any) -> str:
    """A request's value for an error message: repr cut short in length and depth (a value nested a thousand deep
    would exceed the interpreter's recursion limit in plain repr)."""
    return _BRIEF.repr(value)


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80


def is_utf8(text: str) -> bool:
    """False for strings holding lone surrogates, which stand for bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_fields(op: str, fields: dict[str, Any]) -> None:
    allowed = OP_FIELDS[op]
    for name, value in fields.items():
        if name not in allowed:
            raise BadRequest(f"op {op!r} has no field {brief(name)}; its fields are: {', '.join(allowed) or 'none'}")
        types = allowed[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            expected = " or ".join("null" if t is _NONE else t.__name__ for t in types)
            raise BadRequest(f"field {name!r} must be {expected}, not {type(value).__name__}")
    for name in REQUIRED_FIELDS.get(op, ()):
        if name not in fields:
            raise BadRequest(f"op {op!r} needs the field {name!r}")


def encode_result(request_id: str | int | None, result: dict[str, Any], vectors: np.ndarray | None = None) -> list[bytes]:
    """Frames of a successful reply; vectors go in their own raw float32 frame."""
    header = {"v": VERSION, "id": request_id, "ok": True, **result}
    if vectors is None:
        return [msgpack.packb(header, use_bin_type=True)]
    vectors = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE)
    header["shape"] = list(vectors.shape)
    header["dtype"] = VECTOR_DTYPE.str
    return [msgpack.packb(header, use_bin_type=True), vectors.data]


def encode_error(request_id: str | int | None, error: EmbedError) -> list[bytes]:
    """Frames of an error reply."""
    header = {"v": VERSION, "id": request_id, "ok": False, "code": error.code, "message": error.message}
    if error.details:
        header["details"] = error.details
    return [msgpack.packb(header, use_bin_type=True)]


def decode_reply(frames: list[bytes]) -> Reply:
    """Unpack a reply; an error reply raises the EmbedError subclass of its code."""
    header = msgpack.unpackb(frames[0], raw=False)
    if not header.get("ok"):
        raise error_for(header.get("code", "internal"), header.get("message", "no message"), header.get("details"))
    result = {k: v for k, v in header.items() if k not in ("v", "id", "ok", "shape", "dtype")}
    if len(frames) < 2:
        return Reply(header.get("id"), result)
    vectors = np.frombuffer(frames[1], dtype=VECTOR_DTYPE).reshape(header["shape"])
    return Reply(header.get("id"), result, vectors)


def events_socket_path(socket: str | os.PathLike[str]) -> Path:
    """The events socket beside a request socket: ``<stem>.events.sock`` in its folder (daemon and client use this)."""
    path = Path(socket)
    return path.with_name(f"{path.stem}.events.sock")


@dataclass(frozen=True)
class Event:
    """One lifecycle event; ``fields`` holds what the event adds beyond the common keys (docs/protocol.md).

    ``restarted`` and ``missed`` are the subscriber's reading of the stream, not on the wire: since the previous
    event it kept, a new daemon (``started`` changed), and how many events (of any model) were lost.
    """

    kind: str  # "model" or "memory"
    event: str  # e.g. "loaded", "swapped", "pressure_high"
    seq: int  # 1 for a daemon's first event, then one more per event
    time: float  # Unix seconds
    started: float  # when the publishing daemon started, Unix seconds: it names the daemon
    model: str | None  # the model id of a model event
    fields: dict[str, Any]
    restarted: bool = False
    missed: int = 0


_EVENT_KEYS = ("v", "seq", "time", "started", "event", "model")


def encode_event(kind: str, event: str, seq: int, started: float, when: float, fields: dict[str, Any]) -> list[bytes]:
    """The frames of one event: the topic ``<kind>.<event>`` (subscribers filter by prefix), then the map."""
    body = {"v": VERSION, "seq": seq, "time": when, "started": started, "event": event, **fields}
    return [f"{kind}.{event}".encode(), msgpack.packb(body, use_bin_type=True)]


def decode_event(frames: list[bytes]) -> Event:
    """Unpack an event; raises InternalError for frames that are not one, UnsupportedVersion for another ``v``."""
    try:
        kind = frames[0].decode().partition(".")[0]
        body = msgpack.unpackb(frames[1], raw=False)
        version, common = body.get("v"), (body["event"], body["seq"], body["time"], body["started"])
    except Exception as exc:  # msgpack, a missing key, too few frames: the publisher is not an akidb-embed daemon
        raise InternalError(f"an event that does not decode ({exc!r}); is this an akidb-embed events socket?") from None
    if version != VERSION:
        raise UnsupportedVersion(f"event protocol version {version!r}; this client speaks v{VERSION}")
    return Event(kind, *common, body.get("model"), {k: v for k, v in body.items() if k not in _EVENT_KEYS})
