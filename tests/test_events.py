"""Lifecycle events through a real daemon and tiny real models: what a subscriber sees, and in what order."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from akidb_embed.eventlog import event_line
from akidb_embed.memory import MemoryMonitor
from akidb_embed_client import Client, Event, EventStream, ModelUnavailable
from akidb_embed_client.aio import AsyncClient
from akidb_embed_client.events import EventReader
from akidb_embed_client.protocol import encode_event, events_socket_path
from daemon_process import REPO, Daemon, run_daemon, with_ctrl_c
from test_hot_catalog import other_encoder, place  # noqa: F401 - other_encoder is a fixture

POLL = 0.2  # seconds one pass over the stream waits for more


def wait_event(stream: EventStream, wanted: Callable[[Event], bool], timeout: float = 15.0) -> list[Event]:
    """Read until an event is ``wanted``; every event read, that one last. Fails after ``timeout`` seconds."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in stream:
            seen.append(event)
            if wanted(event):
                return seen
    raise AssertionError(f"no such event within {timeout} s; saw {[(e.event, e.model) for e in seen]}")


def named(event: str, model: str | None = None) -> Callable[[Event], bool]:
    return lambda e: e.event == event and (model is None or e.model == model)


def own_copy(model_dir: Path, into: Path) -> Path:
    """A model folder of the test's own, whose files it may replace."""
    shutil.copytree(model_dir, into)
    return into


def test_the_reader_marks_lost_events_and_a_new_daemon_and_filters_by_model() -> None:
    """Frames as two daemons publish them (the second started at time 20), read by a subscriber of model a."""
    reader = EventReader(models=["a"])
    frames = [
        encode_event("model", "loaded", 1, 10.0, 11.0, {"model": "a", "fingerprint": "f1"}),
        encode_event("model", "loaded", 2, 10.0, 12.0, {"model": "b", "fingerprint": "f2"}),  # not a's
        encode_event("memory", "pressure_high", 5, 10.0, 13.0, {"pressure": 0.95}),  # 3 and 4 lost
        encode_event("model", "unloaded", 6, 10.0, 14.0, {"model": "a", "fingerprint": "f1", "reason": "on request"}),
        encode_event("model", "loaded", 3, 20.0, 21.0, {"model": "a", "fingerprint": "f1"}),  # the new daemon's third
    ]
    read = [reader.read(f) for f in frames]
    assert read[1] is None and read[2] is None
    first, unloaded, again = read[0], read[3], read[4]
    assert (first.restarted, first.missed) == (False, 0)
    assert (unloaded.restarted, unloaded.missed) == (False, 2)  # lost before the memory event a's filter left out
    assert again.restarted and again.missed == 2 and again.started == 20.0
    assert event_line(unloaded).split()[2:] == ["unloaded", "a", "fingerprint=f1", "reason=on", "request", "[2", "missed]"]
    assert event_line(again).endswith("fingerprint=f1 [daemon restarted] [2 missed]")


def test_a_subscriber_sees_a_load_a_hot_swap_and_an_eviction_in_order(
    catalog: Path, tiny_models: dict[str, Path], other_encoder: Path, tmp_path: Path  # noqa: F811
) -> None:
    """1. subscribe  2. `swap` loads cold  3. its ONNX file is replaced: swapped, old and new fingerprints as embed
    replies report them  4. e5-tiny loads  5. qwen3-tiny loads: two models at most, so `swap` (least recent) is
    evicted first  6. the events came in that order, seq rising by one."""
    model_dir = own_copy(tiny_models["encoder"], tmp_path / "own")
    place(catalog, "swap", model_dir)
    with run_daemon(catalog, memory={"max_loaded_models": 2}) as daemon, daemon.client() as client:
        with client.events(timeout=POLL) as stream:
            old = client.embed("x", model="swap").fingerprint
            shutil.copy(other_encoder / "model.onnx", model_dir / ".model.onnx.part")
            os.replace(model_dir / ".model.onnx.part", model_dir / "model.onnx")
            seen = wait_event(stream, named("swapped"))
            new = client.embed("x", model="swap").fingerprint
            client.embed("x", model="e5-tiny")
            client.embed("x", model="qwen3-tiny")
            seen += wait_event(stream, named("loaded", "qwen3-tiny"))
    assert [(e.event, e.model) for e in seen] == [
        ("loaded", "swap"), ("swapped", "swap"), ("loaded", "e5-tiny"), ("evicted", "swap"), ("loaded", "qwen3-tiny"),
    ]  # fmt: skip
    loaded, swapped, _, evicted, _ = seen
    assert old != new and loaded.fields["fingerprint"] == old and loaded.fields["load_ms"] > 0
    assert swapped.fields == {"old_fingerprint": old, "fingerprint": new}
    assert evicted.fields == {"fingerprint": new, "reason": "least recently used, to make room for qwen3-tiny"}
    assert [e.seq for e in seen] == list(range(seen[0].seq, seen[0].seq + 5))
    assert all(e.kind == "model" and not e.restarted and not e.missed for e in seen)


def test_a_dropped_in_manifest_is_discovered_and_its_deletion_removed(
    daemon: Daemon, tiny_models: dict[str, Path]
) -> None:
    with daemon.client() as client, client.events(models=["dropped"], timeout=POLL) as stream:
        place(daemon.catalog, "dropped", tiny_models["encoder"])
        (discovered,) = wait_event(stream, named("discovered"))
        (daemon.catalog / "dropped.toml").unlink()
        (removed,) = wait_event(stream, named("removed"))
    assert discovered.fields == {"state": "available", "error": None}
    assert removed.model == "dropped" and removed.fields == {} and removed.seq == discovered.seq + 1


def test_a_model_whose_onnx_file_is_garbage_fails(daemon: Daemon, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    broken = own_copy(tiny_models["encoder"], tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not onnx at all")
    with daemon.client() as client, client.events(models=["broken"], timeout=POLL) as stream:
        place(daemon.catalog, "broken", broken)
        wait_event(stream, named("discovered"))
        with pytest.raises(ModelUnavailable):
            client.embed("x", model="broken")
        (failed,) = wait_event(stream, named("failed"))
    assert "onnxruntime cannot load" in failed.fields["error"] and failed.fields["serving"] is False


def test_the_events_socket_sits_beside_the_request_socket_with_mode_0660(daemon: Daemon) -> None:
    path = daemon.socket.parent / "embed.events.sock"
    assert events_socket_path(daemon.socket) == path
    assert path.is_socket() and path.stat().st_mode & 0o777 == 0o660


def test_the_async_iterator_receives_an_event(daemon: Daemon) -> None:
    async def scenario() -> Event:
        async with AsyncClient(daemon.socket, timeout=30, retries=1) as client:
            first = asyncio.ensure_future(client.events(models=["bge-tiny"]).__anext__())
            deadline = time.monotonic() + 15
            while not first.done():  # loads until one falls after the subscription, which starts in the task
                assert time.monotonic() < deadline, "no event"
                await client.load("bge-tiny")
                await client.unload("bge-tiny")
                await asyncio.wait([first], timeout=POLL)
            return first.result()

    event = asyncio.run(scenario())
    assert event.model == "bge-tiny" and event.event in ("loaded", "unloaded")


def test_the_stream_follows_a_restarted_daemon_and_says_so(catalog: Path) -> None:
    """1. subscribe  2. a load  3. the daemon stops; another starts on the same socket  4. the same stream sees its
    loads, the first marked restarted, with the events it published before the socket reconnected counted missed."""
    socket = Path(tempfile.mkdtemp(prefix="akd-")) / "embed.sock"
    with run_daemon(catalog, socket=socket) as daemon, daemon.client() as client:
        stream = client.events(timeout=POLL)
        client.load("bge-tiny")
        (before,) = wait_event(stream, named("loaded"))
    with stream, run_daemon(catalog, socket=socket) as daemon, daemon.client() as client:
        deadline = time.monotonic() + 15
        while not (seen := list(stream)):  # events before the socket reconnects are lost
            assert time.monotonic() < deadline, "the stream never heard the new daemon"
            client.load("bge-tiny")
            client.unload("bge-tiny")
    after = seen[0]
    assert after.restarted and after.started != before.started and after.missed == after.seq - 1
    assert not any(e.restarted for e in seen[1:])
    shutil.rmtree(socket.parent, ignore_errors=True)


def test_high_memory_pressure_is_published(catalog: Path) -> None:
    """The watermarks sit below the machine's pressure now, so the first upkeep check crosses the high one."""
    pressure = MemoryMonitor().sample().pressure
    if pressure < 0.04:
        pytest.skip(f"memory pressure {pressure:.1%} leaves no room for watermarks below it")
    memory = {"high_watermark": round(pressure / 2, 4), "low_watermark": round(pressure / 4, 4), "check_seconds": 1.5}
    with run_daemon(catalog, memory=memory) as daemon, daemon.client() as client:
        with client.events(timeout=POLL) as stream:
            (high,) = wait_event(stream, named("pressure_high"))
    assert high.kind == "memory" and high.model is None
    assert high.fields["pressure"] > memory["high_watermark"] and "meminfo" in high.fields["source"]
    assert high.fields["high_watermark"] == memory["high_watermark"]
    assert high.fields["low_watermark"] == memory["low_watermark"]


def read_line(stream, deadline: float) -> str:
    """One line from a child's pipe, failing at ``deadline`` (monotonic) rather than blocking for ever."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        assert selector.select(max(0.0, deadline - time.monotonic())), "the child printed nothing in time"
    return stream.readline()


def test_the_events_command_prints_a_load_as_json_and_stops_on_ctrl_c(daemon: Daemon) -> None:
    command = [sys.executable, "-m", "akidb_embed", "events", "--socket", str(daemon.socket), "--json"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             preexec_fn=with_ctrl_c)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        assert "listening" in read_line(child.stderr, deadline)
        with daemon.client() as client:
            client.load("e5-tiny")
        line = json.loads(read_line(child.stdout, deadline))
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=10) == 0
        assert "Traceback" not in child.stderr.read()
    finally:
        child.kill()
        child.wait()
    assert line["event"] == "loaded" and line["model"] == "e5-tiny" and line["fingerprint"]
