"""A live-daemon fuzzer: random and mutated request frames from several clients at once (tests and scripts/fuzz.py).

Each client (half DEALER, pipelining a window of frames; half REQ, one at a time) sends frames that are valid
requests mutated (bit flips, truncation, a value swapped for another type, huge values, deep nesting, frames
split or added) or plain random bytes, and reads every reply. A reply must be one msgpack map, ``ok`` or an
error code of the protocol other than ``internal``, and each frame gets exactly one (a DEALER counts them; an
extra reply would arrive after its count is complete and be counted against the next window).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
from akidb_embed_client.errors import ERROR_CLASSES

MODELS = ["bge-tiny", "qwen3-tiny", "auto", "nope", ""]
WINDOW = 16  # frames a DEALER client has in flight
REPLY_TIMEOUT_MS = 30000
HUGE_TEXT = 256 << 10  # under the daemon's max_request_bytes (4 MiB) and its hard frame limit alike
NESTING = 2000  # deeper than msgpack's own limit of 1024


def valid_request(rng: random.Random, request_id: int) -> dict[str, Any]:
    """A request the daemon accepts (or refuses with a clear error): every op but the slow tune and bench."""
    model = rng.choice(MODELS[:2])
    op = rng.choice(["embed"] * 6 + ["models", "status", "ping", "load", "unload", "pin", "unpin"])
    body: dict[str, Any] = {"v": 1, "id": request_id, "op": op}
    if op == "embed":
        body["texts"] = [rng.choice(["hello world", "the quick brown fox", "ça va?", "x" * rng.randint(1, 600)])
                         for _ in range(rng.randint(1, 8))]  # fmt: skip
        optional = {"model": rng.choice(MODELS), "normalize": rng.random() < 0.5, "truncate": rng.random() < 0.7,
                    "prompt": rng.choice(["query", "document", "none"]), "dimensions": rng.choice([16, 32, 48]),
                    "timeout_ms": rng.randint(1, 5000), "keep_alive": rng.choice([-1, 0, 5, 0.5]),
                    "constraints": {"task": "query"}, "expect_fingerprint": "sha256:0", "allow_fallback": True}  # fmt: skip
        body.update({k: v for k, v in optional.items() if rng.random() < 0.25})
    elif op == "models" and rng.random() < 0.3:
        body["constraints"] = {"max_latency_ms": rng.choice([1, 100]), "languages": ["en"]}
    elif op in ("load", "unload", "pin", "unpin"):
        body["model"] = model
    return body


def _other_value(rng: random.Random) -> Any:
    """A value of any msgpack type: small, huge, or deeply nested."""
    choices: list[Callable[[], Any]] = [
        lambda: None, lambda: True, lambda: rng.randint(-(2**63), 2**64 - 1), lambda: rng.random() * 1e308,
        lambda: float("nan"), lambda: float("-inf"), lambda: "", lambda: "é" * rng.randint(1, 40),
        lambda: bytes(rng.randbytes(rng.randint(0, 40))), lambda: [], lambda: {}, lambda: {1: 2, "k": [None]},
        lambda: "y" * HUGE_TEXT, lambda: ["t"] * rng.randint(300, 5000), lambda: _nested(rng.randint(2, NESTING)),
    ]  # fmt: skip
    return rng.choice(choices)()


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _pack(body: Any) -> bytes:
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (ValueError, OverflowError):  # too deep for the packer too: hand-made nesting instead
        return b"\x91" * NESTING + b"\xc0"


def mutated_frame(rng: random.Random, request_id: int) -> bytes:
    """One frame: a valid request, or one mutated, or random bytes."""
    body = valid_request(rng, request_id)
    kind = rng.random()
    if kind < 0.15:
        return _pack(body)
    if kind < 0.45:  # a value swapped for another type, or a field added
        key = rng.choice([*body, "extra", 7])
        body[key] = _other_value(rng)
        return _pack(body)
    if kind < 0.55:  # the whole request replaced
        return _pack(_other_value(rng))
    frame = bytearray(_pack(body))
    if kind < 0.75:  # bit flips
        for _ in range(rng.randint(1, 8)):
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        return bytes(frame)
    if kind < 0.9:  # truncation
        return bytes(frame[: rng.randrange(len(frame))])
    return rng.randbytes(rng.randint(0, 200))


def body_frames(rng: random.Random, request_id: int) -> list[bytes]:
    """The request body: one frame mostly, sometimes none, two, or an empty one."""
    frame = mutated_frame(rng, request_id)
    roll = rng.random()
    if roll < 0.02:
        return []
    if roll < 0.04:
        return [frame, frame]
    return [frame]


KNOWN_CODES = set(ERROR_CLASSES) - {"internal"}


@dataclass
class Figures:
    """What a fuzz run saw, from every client."""

    deadline: float = float("inf")  # time.monotonic() past which clients send no more
    sent: int = 0
    answered: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, frames: list[bytes]) -> None:
        """Count one reply; one that is not a map, or is ``internal``, or has an unknown code, is a failure."""
        header = _header(frames)
        with self.lock:
            self.answered += 1
            outcome = "ok" if header.get("ok") is True else str(header.get("code"))
            self.outcomes[outcome] += 1
            if outcome != "ok" and outcome not in KNOWN_CODES and len(self.failures) < 20:
                self.failures.append(f"reply {header!r:.300}")

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


def _header(frames: list[bytes]) -> dict[str, Any]:
    """The reply's msgpack header: the first frame after the empty delimiter (or the first, without one)."""
    after = frames[frames.index(b"") + 1 :] if b"" in frames else frames
    try:
        header = msgpack.unpackb(after[0], raw=False)
    except Exception as exc:  # noqa: BLE001 - an undecodable reply is a failure to report
        return {"code": f"undecodable reply: {exc!r}"}
    return header if isinstance(header, dict) else {"code": f"reply not a map: {header!r:.100}"}


def _dealer_client(context: zmq.Context, path: Path, rng: random.Random, frames: int, figures: Figures) -> None:
    """Windows of WINDOW frames; every reply of a window is read before the next window goes."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"ipc://{path}")
    try:
        done = 0
        while done < frames and time.monotonic() < figures.deadline:
            window = min(WINDOW, frames - done)
            for i in range(window):
                socket.send_multipart([b"", *body_frames(rng, done + i)])
            with figures.lock:
                figures.sent += window
            for _ in range(window):
                if not socket.poll(REPLY_TIMEOUT_MS):
                    figures.fail(f"a DEALER frame got no reply in {REPLY_TIMEOUT_MS} ms")
                    return
                figures.reply(socket.recv_multipart())
            done += window
        if socket.poll(500):
            figures.fail(f"a DEALER got a reply more than it sent frames: {socket.recv_multipart()!r:.200}")
    finally:
        socket.close()


def _req_client(context: zmq.Context, path: Path, rng: random.Random, frames: int, figures: Figures) -> None:
    """One frame, then its reply, ``frames`` times."""
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"ipc://{path}")
    try:
        for i in range(frames):
            if time.monotonic() >= figures.deadline:
                return
            socket.send_multipart(body_frames(rng, i) or [b""])  # REQ cannot send a message of no frames
            with figures.lock:
                figures.sent += 1
            if not socket.poll(REPLY_TIMEOUT_MS):
                figures.fail(f"a REQ frame got no reply in {REPLY_TIMEOUT_MS} ms")
                return
            figures.reply(socket.recv_multipart())
    finally:
        socket.close()


def run_fuzz(
    path: Path, frames: int, clients: int = 4, seed: int = 0, seconds: float = float("inf"),
    progress: Callable[[Figures], None] | None = None,
) -> Figures:
    """Send ``frames`` fuzzed frames to the daemon at ``path`` from ``clients`` threads (DEALER and REQ in turn),
    for ``seconds`` at most; ``progress`` is called about once a second while they run."""
    figures = Figures(deadline=time.monotonic() + seconds)
    context = zmq.Context()
    share = -(-frames // clients)
    threads = [
        threading.Thread(target=_dealer_client if i % 2 == 0 else _req_client,
                         args=(context, path, random.Random(seed * 1000 + i), min(share, frames - i * share), figures))
        for i in range(clients)
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(1.0)
            if progress is not None:
                progress(figures)
    context.term()
    return figures
