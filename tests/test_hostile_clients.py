"""Clients that do not read, that vanish, that flood connections or send absurd ids cost the daemon bounded memory.

Each test runs a real daemon and measures its resident memory (VmRSS) and descriptors in /proc.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from akidb_embed.backpressure import REPLY_HWM
from akidb_embed_client.protocol import MAX_ID_LENGTH
from daemon_process import Daemon, run_daemon, wait_for
from procwatch import open_fds, rss_kib

MODEL = "qwen3-tiny"  # 48 dimensions: the widest reply of the tiny catalog
BIG = 2048  # texts per request: a reply of BIG x 48 x 4 bytes = 384 KiB
REPLY_BYTES = BIG * 48 * 4
IDLE_TRIM_WAIT = 2.0  # a model idle for a second hands its batches' memory back (batcher.py)
HEAP_NOISE_KIB = 8 << 10  # what the allocator and the interpreter may hold beyond a trim


def frame(op: str, request_id: object, **fields: object) -> list[bytes]:
    """A DEALER request: the empty delimiter, then the msgpack map."""
    return [b"", msgpack.packb({"v": 1, "id": request_id, "op": op, **fields}, use_bin_type=True)]


@contextlib.contextmanager
def dealer(daemon: Daemon, **options: int) -> Iterator[zmq.Socket]:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDTIMEO, 10000)  # a send the daemon never takes fails the test, not hangs it
    for option, value in options.items():
        socket.setsockopt(getattr(zmq, option), value)
    socket.connect(f"ipc://{daemon.socket}")
    try:
        yield socket
    finally:
        socket.close()


def settled_rss_kib(daemon: Daemon) -> int:
    """The daemon's RSS once its models idled long enough to trim the heap."""
    time.sleep(IDLE_TRIM_WAIT)
    return rss_kib(daemon.process.pid)


def timed_embed(daemon: Daemon) -> float:
    """Seconds one single-text embed takes on a fresh reading client."""
    with daemon.client(timeout=30) as client:
        started = time.monotonic()
        client.embed(["are you still there"], MODEL)
        return time.monotonic() - started


def test_a_non_reading_client_cannot_grow_memory_or_delay_others(catalog: Path) -> None:
    """1. A reading client warms the model with the big request, then the daemon's RSS is taken.
    2. A DEALER that never reads (its own receive queue holds one message) sends big embeds, each followed
       by a reading client's single text: 100 replies of 384 KiB, 37.5 MiB in all, go unread.
    3. It then floods 1,000 more without pause, while the reading client keeps asking.
    4. The daemon holds at most REPLY_HWM of the unread replies: RSS grows by no more than those and the
       heap's noise; the reading client was answered promptly throughout; status counts the dropped replies
       and the one muted peer.
    """
    with run_daemon(catalog, limits={"max_texts": BIG}) as daemon:
        texts = ["a short text to embed"] * BIG
        with daemon.client(timeout=30) as client:
            client.embed(texts, MODEL)
            client.embed(["warm"], MODEL)
        before = settled_rss_kib(daemon)
        bound = (REPLY_HWM + 2) * REPLY_BYTES // 1024 + HEAP_NOISE_KIB
        latencies = []
        with dealer(daemon, RCVHWM=1, RCVBUF=4096) as hostile:
            for i in range(100):  # 2. paced by the reading client, so the queue admits every request
                hostile.send_multipart(frame("embed", i, texts=texts, model=MODEL))
                latencies.append(timed_embed(daemon))
            grown = settled_rss_kib(daemon) - before
            assert grown <= bound, f"RSS grew {grown} KiB for a client that does not read; bound {bound} KiB"
            for i in range(1000):  # 3.
                hostile.send_multipart(frame("embed", 100 + i, texts=texts, model=MODEL))
                if i % 100 == 0:
                    latencies.append(timed_embed(daemon))
            with daemon.client() as client:
                wait_for(lambda: client.status()["dropped_replies"]["not_reading"] >= 1000, timeout=30)
                status = client.status()
            grown = settled_rss_kib(daemon) - before
        assert grown <= bound, f"RSS grew {grown} KiB after a flood from a client that does not read; bound {bound} KiB"
        assert max(latencies) < 2.0, f"a reading client waited {max(latencies):.2f} s behind one that does not read"
        assert status["muted_peers"] == 1 and status["dropped_replies"]["peer_gone"] == 0
        assert daemon.alive()


def test_a_reply_to_a_vanished_client_is_counted(catalog: Path) -> None:
    """A DEALER sends a big embed and disconnects before its reply: status counts one reply dropped, peer gone."""
    with run_daemon(catalog, limits={"max_texts": BIG}) as daemon:
        with daemon.client(timeout=30) as client:
            client.embed(["warm"], MODEL)
            for i in range(5):  # the disconnect must beat the reply: almost always the first time
                with dealer(daemon) as vanishing:
                    vanishing.send_multipart(frame("embed", i, texts=["gone"] * BIG, model=MODEL))
                    vanishing.setsockopt(zmq.LINGER, 1000)  # the request leaves before the socket closes
                with contextlib.suppress(AssertionError):
                    wait_for(lambda: client.status()["dropped_replies"]["peer_gone"] >= 1, timeout=3)
                    break
            status = client.status()
        assert status["dropped_replies"]["peer_gone"] >= 1
        assert status["dropped_replies"]["not_reading"] == 0 and status["muted_peers"] == 0


@contextlib.contextmanager
def soft_descriptor_limit(limit: int) -> Iterator[None]:
    """This process's soft descriptor limit lowered to ``limit`` (a daemon started meanwhile inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_connections(context: zmq.Context, daemon: Daemon, count: int) -> list[zmq.Socket]:
    """``count`` DEALER connections, each answered once (so the daemon has accepted every one)."""
    sockets = []
    for i in range(count):
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(f"ipc://{daemon.socket}")
        socket.send_multipart(frame("ping", i))
        sockets.append(socket)
    for socket in sockets:
        assert socket.poll(10000), "a connection of the flood was not answered"
        socket.recv_multipart()
    return sockets


CONNECTIONS = 1000
ROUNDS = 5
CONNECTION_KIB = 64  # libzmq's cost of one connection is about 30 KiB (two pipes, a session, 8 KiB buffers each way)


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < CONNECTIONS + 512, reason="needs 1,500 descriptors")
def test_a_connection_flood_is_bounded(catalog: Path) -> None:
    """1. The daemon starts under a soft descriptor limit of 256 (systemd's default is 1024), which it raises.
    2. Five times, 1,000 connections are opened at once, each answered, then closed.
    3. While held they cost under 64 KiB each; once closed, the descriptors are all given back and, after a
       trim, the memory too. The daemon was never ended by a refused accept, and serves on.
    """
    with contextlib.ExitStack() as stack:
        with soft_descriptor_limit(256):  # only the daemon starts under it: the test's sockets need more
            daemon = stack.enter_context(run_daemon(catalog))
        context = stack.enter_context(zmq.Context())
        context.set(zmq.MAX_SOCKETS, 4 * CONNECTIONS)  # closed sockets hold their slot until reaped
        pid = daemon.process.pid
        timed_embed(daemon)
        fds, before = open_fds(pid), settled_rss_kib(daemon)
        for round_ in range(ROUNDS):
            sockets = open_connections(context, daemon, CONNECTIONS)
            held = rss_kib(pid) - before
            if round_ == 0:
                assert held <= CONNECTIONS * CONNECTION_KIB, f"{CONNECTIONS} connections cost {held} KiB"
            for socket in sockets:
                socket.close()
        wait_for(lambda: open_fds(pid) <= fds, timeout=10)  # a descriptor open at the first count may have closed
        timed_embed(daemon)  # a batch, so that the idle model trims the heap
        grown = settled_rss_kib(daemon) - before
        assert grown <= HEAP_NOISE_KIB, f"RSS grew {grown} KiB after {ROUNDS} floods of {CONNECTIONS} connections"
        assert daemon.alive()


def test_an_absurd_id_is_refused_and_not_echoed(daemon: Daemon) -> None:
    """An id of 60,000 characters (within the byte limit), or of MAX_ID_LENGTH + 1, gets bad_request naming the limit and no id back;
    one of MAX_ID_LENGTH is echoed."""
    with dealer(daemon) as client:
        for request_id in ("x" * 60_000, "y" * (MAX_ID_LENGTH + 1)):
            client.send_multipart(frame("ping", request_id))
            assert client.poll(10000)
            header = msgpack.unpackb(client.recv_multipart()[-1], raw=False)
            assert (header["ok"], header["code"], header["id"]) == (False, "bad_request", None)
            assert str(MAX_ID_LENGTH) in header["message"]
        client.send_multipart(frame("ping", "z" * MAX_ID_LENGTH))
        assert client.poll(10000)
        assert msgpack.unpackb(client.recv_multipart()[-1], raw=False)["id"] == "z" * MAX_ID_LENGTH

