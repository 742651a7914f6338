"""Fuzzing: the protocol decoder against any bytes and any msgpack value (hypothesis), ``embed`` fields against a
live daemon, and a few thousand random and mutated frames from several clients at once (scripts/fuzz.py is the
long run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import tinymodels
import zmq
from akidb_embed_client import protocol
from akidb_embed_client.errors import EmbedError
from daemon_process import Daemon, run_daemon
from framefuzz import KNOWN_CODES, MODELS, run_fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
SCALARS = st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=40) | st.binary(max_size=40)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=10) | INTS, inner, max_size=5), max_leaves=30)  # fmt: skip


def decodes_or_refuses(frame: bytes) -> None:
    """decode_request either gives a Request or raises an EmbedError subclass: nothing else."""
    try:
        request = protocol.decode_request(frame)
    except EmbedError:
        return
    assert request.op in protocol.OP_FIELDS


@given(st.binary(max_size=512))
def test_decoder_takes_any_bytes(frame: bytes) -> None:
    decodes_or_refuses(frame)


@given(VALUES)
def test_decoder_takes_any_msgpack_value(value: Any) -> None:
    decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


@given(st.sampled_from(sorted(protocol.OP_FIELDS)), st.one_of(INTS, st.text(max_size=200), VALUES), st.dictionaries(st.sampled_from(sorted({f for fs in protocol.OP_FIELDS.values() for f in fs})), VALUES))
def test_decoder_takes_any_fields_of_any_op(op: str, request_id: Any, fields: dict[str, Any]) -> None:
    decodes_or_refuses(msgpack.packb({"v": 1, "id": request_id, "op": op, **fields}, use_bin_type=True))


@pytest.fixture(scope="module")
def live_daemon(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for every example: bge-tiny (the default) and qwen3-tiny."""
    catalog = tmp_path_factory.mktemp("fuzz") / "models.d"
    tinymodels.write_manifest(catalog, "bge-tiny", tiny_models["encoder"], **tinymodels.BGE_FIELDS, default=True)
    tinymodels.write_manifest(catalog, "qwen3-tiny", tiny_models["decoder"], **tinymodels.QWEN3_FIELDS)
    with run_daemon(catalog, limits={"max_texts": 64, "max_request_bytes": 1 << 20}) as daemon:
        yield daemon


TEXTS = st.lists(st.text(max_size=300) | VALUES, min_size=0, max_size=70) | VALUES
EMBED_FIELDS = st.fixed_dictionaries({"texts": TEXTS}, optional={
    "model": st.sampled_from(MODELS) | VALUES, "normalize": st.booleans() | VALUES, "truncate": st.booleans() | VALUES,
    "prompt": st.sampled_from(["query", "document", ""]) | VALUES,
    "dimensions": INTS | st.sampled_from([16, 32, 48]) | VALUES,
    "timeout_ms": INTS | VALUES, "keep_alive": st.floats() | st.integers(-5, 5) | VALUES,
    "constraints": st.dictionaries(st.sampled_from(["task", "languages", "max_latency_ms", "prefer", "dimension", "x"]),
                                   VALUES | st.floats() | st.sampled_from(["query", "en", "speed"])) | VALUES,
    "expect_fingerprint": st.text(max_size=70) | VALUES, "allow_fallback": st.booleans() | VALUES,
    "colour": VALUES,
})  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fields=EMBED_FIELDS)
def test_any_embed_fields_get_one_known_reply(live_daemon: Daemon, fields: dict[str, Any]) -> None:
    """Whatever the embed fields, exactly one reply: ok, or an error code of the protocol, never internal."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"ipc://{live_daemon.socket}")
    try:
        socket.send_multipart([b"", msgpack.packb({"v": 1, "id": "fuzz", "op": "embed", **fields}, use_bin_type=True)])
        assert socket.poll(30000), f"no reply to {fields!r:.300}"
        header = msgpack.unpackb(socket.recv_multipart()[1], raw=False)
        assert not socket.poll(20), "a second reply"
    finally:
        socket.close()
    assert header["id"] == "fuzz"
    assert header["ok"] is True or header["code"] in KNOWN_CODES, f"{header!r:.300} for {fields!r:.300}"


def test_thousands_of_fuzzed_frames_from_several_clients(live_daemon: Daemon) -> None:
    """4,000 random and mutated frames from two DEALER and two REQ clients at once: each answered exactly once
    with a known code, the daemon alive and serving afterwards."""
    figures = run_fuzz(live_daemon.socket, frames=4000, clients=4, seed=1)
    assert figures.failures == []
    assert figures.sent == figures.answered == 4000
    assert figures.outcomes["ok"] > 100 and figures.outcomes["bad_request"] > 1000  # both paths were exercised
    assert live_daemon.alive()
    with live_daemon.client() as client:
        assert client.embed(["still serving"], "bge-tiny").shape == (1, 32)
