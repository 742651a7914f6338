"""Daemon lifecycle: the socket file, SIGHUP rescans, SIGTERM finishes what is in flight."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import tinymodels
import zmq
from akidb_embed_client import errors
from daemon_process import Daemon, run_daemon, wait_for


def test_socket_is_group_accessible_only(daemon: Daemon) -> None:
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    assert mode == 0o660, oct(mode)


def test_a_second_daemon_on_a_live_socket_refuses(daemon: Daemon) -> None:
    command = [sys.executable, "-m", "akidb_embed", "serve", "--socket", str(daemon.socket), "--catalog", str(daemon.catalog)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "another akidb-embed answers on" in result.stderr
    with daemon.client() as client:
        assert client.ping()["pong"]


def test_stale_socket_file_is_replaced(catalog: Path, tmp_path: Path) -> None:
    with run_daemon(catalog) as first:
        socket = first.socket
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.write_bytes(b"")  # what a crashed daemon leaves behind
    with run_daemon(catalog, socket=socket) as second, second.client() as client:
        assert client.embed("after a crash").shape == (1, 32)


def test_sighup_rescans_the_catalog(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    """1. add a manifest, SIGHUP: it serves  2. remove it, SIGHUP: unknown_model  3. the others never stop."""
    tinymodels.write_manifest(daemon.catalog, "late-bge", tiny_models["encoder"], **tinymodels.BGE_FIELDS)
    daemon.signal(signal.SIGHUP)
    with daemon.client() as client:
        wait_for(lambda: any(m["id"] == "late-bge" for m in client.models()))
        assert client.embed("new model", model="late-bge").model == "late-bge"
        (daemon.catalog / "late-bge.toml").unlink()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: all(m["id"] != "late-bge" for m in client.models()))
        with pytest.raises(errors.UnknownModel):
            client.embed("gone", model="late-bge")
        assert client.embed("still here", model="e5-tiny").model == "e5-tiny"


def test_sigterm_answers_every_request_in_flight(catalog: Path) -> None:
    """1. 24 slow requests in flight  2. SIGTERM  3. each gets exactly one reply, and the daemon exits 0."""
    with run_daemon(catalog, limits={"max_batch": 2}) as daemon:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(f"ipc://{daemon.socket}")
        for i in range(24):
            frame = msgpack.packb({"v": 1, "id": i, "op": "embed", "texts": ["word " * 500] * 2})
            socket.send_multipart([b"", frame])
        time.sleep(0.2)
        daemon.signal(signal.SIGTERM)
        replies: dict[int, dict] = {}
        while len(replies) < 24 and socket.poll(20000):
            header = msgpack.unpackb(socket.recv_multipart()[1], raw=False)
            assert header["id"] not in replies
            replies[header["id"]] = header
        socket.close()
        assert daemon.process.wait(timeout=30) == 0
    assert len(replies) == 24
    assert {r.get("code", "ok") for r in replies.values()} <= {"ok", "shutting_down"}
    assert any(r["ok"] for r in replies.values())
