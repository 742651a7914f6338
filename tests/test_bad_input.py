"""Bad input gets one clear error reply with the right code; the daemon stays up and serves on.

Every case talks to a real daemon over its real socket, with raw frames where the client
library would refuse to send such a thing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import tinymodels
import zmq
from akidb_embed_client import errors
from daemon_process import Daemon, run_daemon, wait_for


def raw_call(daemon: Daemon, *frames: bytes, timeout_ms: int = 10000) -> dict:
    """Send raw frames on a REQ socket; the decoded reply header."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"ipc://{daemon.socket}")
    try:
        socket.send_multipart(list(frames))
        assert socket.poll(timeout_ms), "the daemon did not reply"
        reply = socket.recv_multipart()
    finally:
        socket.close()
    return msgpack.unpackb(reply[0], raw=False)


def embed_frame(**fields) -> bytes:
    return msgpack.packb({"v": 1, "id": "r1", "op": "embed", **fields}, use_bin_type=True)


def assert_still_serving(daemon: Daemon) -> None:
    with daemon.client() as client:
        vectors = client.embed(["still serving"])
    assert vectors.shape == (1, 32) and np.isfinite(vectors).all()
    assert daemon.alive()


RAW_CASES = {
    "not msgpack": (b"\xc1\xc1 definitely not msgpack", "bad_request", "not valid msgpack"),
    "not a map": (msgpack.packb([1, 2, 3]), "bad_request", "not a map"),
    "no id": (msgpack.packb({"v": 1, "op": "ping"}), "bad_request", "no id"),
    "unknown op": (msgpack.packb({"v": 1, "id": 1, "op": "explode"}), "bad_request", "unknown op"),
    "op not a string": (msgpack.packb({"v": 1, "id": 1, "op": ["embed"]}), "bad_request", "unknown op"),
    "id not utf-8": (msgpack.packb({"v": 1, "id": b"\xff\xfe", "op": "ping"}, use_bin_type=False), "bad_request", "id"),
    "version true": (msgpack.packb({"v": True, "id": 1, "op": "ping"}), "unsupported_version", "v1"),
    "negative timeout": (embed_frame(texts=["a"], timeout_ms=-5), "bad_request", "timeout_ms"),
    "version 2": (msgpack.packb({"v": 2, "id": 1, "op": "ping"}), "unsupported_version", "v1"),
    "no texts": (embed_frame(), "bad_request", "'texts'"),
    "texts not a list": (embed_frame(texts="hello"), "bad_request", "'texts' must be list"),
    "model not a string": (embed_frame(texts=["a"], model=7), "bad_request", "'model' must be str"),
    "normalize not a bool": (embed_frame(texts=["a"], normalize="yes"), "bad_request", "'normalize'"),
    "dimensions a bool": (embed_frame(texts=["a"], dimensions=True), "bad_request", "'dimensions'"),
    "unknown field": (embed_frame(texts=["a"], colour="red"), "bad_request", "no field 'colour'"),
    "empty texts": (embed_frame(texts=[]), "bad_request", "texts is empty"),
    "non-string text": (embed_frame(texts=["a", 5]), "bad_request", "texts[1] is a int"),
    "bytes text": (embed_frame(texts=["a", b"\x00\x01"]), "bad_request", "texts[1] is a bytes"),
    "too many texts": (embed_frame(texts=["a"] * 17), "bad_request", "limit is 16"),
    "over the byte limit": (embed_frame(texts=["x" * 70000]), "bad_request", "max_request_bytes"),
    "invalid utf-8": (
        msgpack.packb({"v": 1, "id": "r1", "op": "embed", "texts": ["ok", b"caf\xe9"]}, use_bin_type=False),
        "bad_request",
        "texts[1] is not valid UTF-8",
    ),
    "unknown model": (embed_frame(texts=["a"], model="nope"), "unknown_model", "'nope'"),
    "prompt not utf-8": (
        msgpack.packb({"v": 1, "id": "r1", "op": "embed", "texts": ["ok"], "prompt": b"\xff"}, use_bin_type=False),
        "bad_request",
        "prompt is not valid UTF-8",
    ),
    "dimensions not allowed": (embed_frame(texts=["a"], dimensions=7), "bad_request", "cannot give 7"),
    "too long, no truncation": (
        embed_frame(texts=["short", "word " * 600], truncate=False),
        "input_too_long",
        "texts[1]",
    ),
}


@pytest.mark.parametrize("name", RAW_CASES)
def test_bad_request_gets_one_clear_error(daemon: Daemon, name: str) -> None:
    """1. send the bad frame  2. get an error reply with the code and cause  3. serve on."""
    frame, code, cause = RAW_CASES[name]
    reply = raw_call(daemon, frame)
    assert reply["ok"] is False
    assert reply["code"] == code, reply
    assert cause in reply["message"], reply["message"]
    if name not in ("not msgpack", "not a map", "no id", "id not utf-8"):
        assert reply["id"] in ("r1", 1)
    assert_still_serving(daemon)


def test_several_body_frames_are_refused(daemon: Daemon) -> None:
    reply = raw_call(daemon, msgpack.packb({"v": 1, "id": 1, "op": "ping"}), b"extra")
    assert reply["code"] == "bad_request" and "one msgpack frame" in reply["message"]
    assert_still_serving(daemon)


def test_client_library_maps_codes_to_exceptions(daemon: Daemon) -> None:
    with daemon.client() as client:
        with pytest.raises(errors.UnknownModel, match="nope"):
            client.embed(["a"], model="nope")
        with pytest.raises(errors.InputTooLong):
            client.embed(["word " * 600], truncate=False)
        with pytest.raises(errors.BadRequest, match="allowed: 16, 32, 48"):
            client.embed(["a"], model="qwen3-tiny", dimensions=20)
        assert client.embed(["word " * 600]).tokens == [512]  # truncated by default


def test_vanished_clients_leak_nothing(daemon: Daemon) -> None:
    """1. 30 clients send an embed and close at once  2. the daemon drops their replies  3. nothing stays in flight."""
    context = zmq.Context.instance()
    for i in range(30):
        socket = context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 1000)  # the request is delivered, then the client is gone
        socket.connect(f"ipc://{daemon.socket}")
        socket.send(embed_frame(texts=[f"gone {i}"] * 8))
        socket.close()
    assert_still_serving(daemon)
    with daemon.client() as client:
        # Their requests may still be arriving (each closed socket flushes on its own): wait for all.
        wait_for(lambda: client.models()[0]["requests"] >= 31)
        status = client.status()
    assert status["in_flight"] == 0 and status["queued_texts"] == 0


def test_full_queue_answers_overloaded_at_once(catalog: Path) -> None:
    """1. a queue of 8 texts  2. a burst of 40 requests of 4 texts  3. each gets one reply; some are overloaded."""
    with run_daemon(catalog, limits={"queue_texts": 8, "max_batch": 4}) as daemon:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(f"ipc://{daemon.socket}")
        long_text = "word " * 400  # slow enough that the queue fills
        for i in range(40):
            frame = msgpack.packb({"v": 1, "id": i, "op": "embed", "texts": [long_text] * 4})
            socket.send_multipart([b"", frame])
        replies = {}
        while len(replies) < 40 and socket.poll(20000):
            header = msgpack.unpackb(socket.recv_multipart()[1], raw=False)
            assert header["id"] not in replies, "two replies to one request"
            replies[header["id"]] = header
        socket.close()
        assert len(replies) == 40
        codes = [r.get("code", "ok") for r in replies.values()]
        assert "overloaded" in codes and "ok" in codes, codes
        assert set(codes) <= {"ok", "overloaded"}
        assert_still_serving(daemon)


@pytest.mark.parametrize("damage", ["missing onnx", "corrupt onnx", "corrupt tokenizer"])
def test_broken_model_files_make_only_that_model_unavailable(
    tmp_path: Path, catalog: Path, tiny_models: dict[str, Path], damage: str
) -> None:
    """1. a manifest whose files are broken beside good ones  2. model_unavailable naming the cause  3. the others serve."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["encoder"], broken)
    if damage == "missing onnx":
        (broken / "model.onnx").unlink()
    elif damage == "corrupt onnx":
        (broken / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    else:
        (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    tinymodels.write_manifest(catalog, "broken", broken, **tinymodels.BGE_FIELDS)
    (catalog / "garbage.toml").write_text("id = [unclosed")
    with run_daemon(catalog) as daemon, daemon.client() as client:
        with pytest.raises(errors.ModelUnavailable) as caught:
            client.embed(["hello"], model="broken")
        expected = {"missing onnx": "No such file", "corrupt onnx": "onnxruntime cannot load", "corrupt tokenizer": "tokenizer"}
        assert expected[damage] in str(caught.value)
        with pytest.raises(errors.ModelUnavailable):  # still refused, not retried on every request
            client.embed(["hello again"], model="broken")
        models = {m["id"]: m for m in client.models()}
        assert models["broken"]["state"] == "failed" and models["broken"]["error"]
        assert models["garbage"]["state"] == "invalid" and "not valid TOML" in models["garbage"]["error"]
        for model_id in ("bge-tiny", "e5-tiny", "qwen3-tiny"):
            assert client.embed(["others serve"], model=model_id).model == model_id
