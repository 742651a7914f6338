"""The client libraries and the CLI against a small stand-in daemon on a real ipc:// socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from akidb_embed import cli, modeltable
from akidb_embed.cli import add_client_commands
from akidb_embed_client import (
    KEEP_ALIVE_FOREVER,
    AsyncClient,
    BadRequest,
    Client,
    Embeddings,
    InputTooLong,
    InsufficientMemory,
    InternalError,
    Overloaded,
    Unavailable,
    UnknownModel,
)
from akidb_embed_client.errors import EmbedError, error_for
from akidb_embed_client.protocol import Request, decode_request, encode_error, encode_result

# A handler answers one decoded request with reply frames, or None to stay silent.
Handler = Callable[[Request], "list[bytes] | None"]

MIB = 1024 * 1024
MODELS = [
    {"id": "mini", "state": "ready", "dimension": 3, "pooling": "mean", "max_length": 256,
     "default": True, "error": None, "family": "test", "pinned": True, "keep_alive": 300.0,
     "memory_mb": 87.4, "memory_source": "measured", "weights_mb": 23.1, "work_mb": 64.0, "peak_mb": 51.5,
     "loaded_at": 1000.0, "last_used": 1010.0,
     "in_flight": 2, "requests": 41, "served": 950, "load_ms": 412.3, "verification": "passed",
     "selftest": {"min_cosine": 0.999998, "mean_cosine": 0.999999, "tolerance": 0.999, "texts": 31, "ms": 41.5}},
    {"id": "broken", "state": "failed", "dimension": 8, "pooling": "cls", "max_length": 512,
     "default": False, "error": "model.onnx is missing", "pinned": False, "keep_alive": -1,
     "memory_mb": 90, "memory_source": "manifest", "loaded_at": None, "last_used": None,
     "in_flight": 0, "requests": 0, "served": 0, "load_ms": None},
]
STATUS = {
    "version": "0.1.0", "uptime_s": 1.5, "models": {"ready": 1, "failed": 1}, "queue": {},
    "memory": {"total": 8192 * MIB, "available": 2048 * MIB, "used": 6144 * MIB, "own_rss": 412 * MIB,
               "swap_used": 0, "swap_total": 0, "lfb_mb": 1864.0, "source": "tegrastats+meminfo", "pressure": 0.75},
    "budget": {"model_memory_mb": 2048, "max_loaded_models": 2, "loaded_models": 1, "loaded_memory_mb": 87.4,
               "high_watermark": 0.85, "low_watermark": 0.7},
    "evictions": 3,
}
MODEL_OPS = ("load", "unload", "pin", "unpin")


def vector(text: str) -> list[float]:
    """A made-up embedding that differs per text, so order mistakes show."""
    return [float(len(text)), float(sum(map(ord, text)) % 97), 1.0]


def answer(request: Request, request_id: str | int | None = None) -> list[bytes]:
    """What a healthy daemon would reply to ``request``."""
    rid = request.id if request_id is None else request_id
    if request.op == "embed":
        texts = request.fields["texts"]
        result = {"model": request.fields.get("model") or "mini", "fingerprint": "fp-1", "dim": 3,
                  "tokens": [len(t) + 2 for t in texts]}
        return encode_result(rid, result, np.array([vector(t) for t in texts], dtype=np.float32))
    if request.op == "models":
        return encode_result(rid, {"models": MODELS})
    if request.op == "status":
        return encode_result(rid, STATUS)
    if request.op in MODEL_OPS:
        return encode_result(rid, {"model": {**MODELS[0], "id": request.fields["model"], "op": request.op}})
    return encode_result(rid, {"pong": True})


class StandIn:
    """A ROUTER socket in a thread that answers each request with its handler's frames.

    With ``batch`` > 1 it holds replies until that many are ready and sends them in reverse.
    """

    def __init__(self, path: Path, handler: Handler = answer, batch: int = 1) -> None:
        self.path = path
        self.handler = handler
        self.batch = batch
        self.requests: list[Request] = []
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.bind(f"ipc://{path}")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        held: list[list[bytes]] = []
        while not self._stop.is_set():
            if not self._router.poll(20):
                continue
            identity, delimiter, frame = self._router.recv_multipart()
            request = decode_request(frame)
            self.requests.append(request)
            reply = self.handler(request)
            if reply is not None:
                held.append([identity, delimiter, *reply])
            if len(held) >= self.batch:
                for message in reversed(held):
                    self._router.send_multipart(message)
                held.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._router.close(linger=0)
        self._context.term()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., StandIn]]:
    """Start stand-ins on a socket in tmp_path; they stop at the end of the test."""
    started: list[StandIn] = []

    def start(handler: Handler = answer, batch: int = 1) -> StandIn:
        stand_in = StandIn(tmp_path / "embed.sock", handler, batch)
        started.append(stand_in)
        return stand_in

    yield start
    for stand_in in started:
        stand_in.close()


def test_embed_returns_float32_rows_in_order_with_metadata(serve: Callable[..., StandIn]) -> None:
    daemon = serve()
    texts = ["alpha", "be", "gamma ray"]
    with Client(daemon.path, timeout=0.5) as client:
        vectors = client.embed(texts, normalize=False, prompt="query")
        single = client.embed("solo")
    assert isinstance(vectors, Embeddings)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 3)
    np.testing.assert_array_equal(vectors, np.array([vector(t) for t in texts], dtype=np.float32))
    assert (vectors.model, vectors.fingerprint, vectors.dimension) == ("mini", "fp-1", 3)
    assert vectors.tokens == [7, 4, 11]
    assert vectors[1:].model == "mini" and vectors[0].fingerprint == "fp-1"
    vectors /= 2  # copied out of the reply frame, so writable
    assert single.shape == (1, 3)
    fields = daemon.requests[0].fields
    assert fields["texts"] == texts and fields["normalize"] is False and fields["prompt"] == "query"
    assert fields["timeout_ms"] == 500 and "model" not in fields
    assert daemon.requests[1].fields["texts"] == ["solo"]


def test_models_status_and_ping(serve: Callable[..., StandIn]) -> None:
    daemon = serve()
    with Client(daemon.path, timeout=0.5) as client:
        assert client.models() == MODELS
        assert client.status() == STATUS
        assert client.ping() == {"pong": True}


@pytest.mark.parametrize(
    ("code", "cls"),
    [("unknown_model", UnknownModel), ("input_too_long", InputTooLong), ("overloaded", Overloaded),
     ("bad_request", BadRequest), ("insufficient_memory", InsufficientMemory), ("something_new", InternalError)],
)
def test_error_reply_raises_its_class(serve: Callable[..., StandIn], code: str, cls: type[EmbedError]) -> None:
    daemon = serve(lambda request: encode_error(request.id, error_for(code, "because of a test")))
    with Client(daemon.path, timeout=0.5) as client, pytest.raises(cls) as caught:
        client.embed(["x"])
    assert "because of a test" in caught.value.message


def test_model_ops_send_the_model_and_return_its_description(serve: Callable[..., StandIn]) -> None:
    daemon = serve()
    with Client(daemon.path, timeout=0.5) as client:
        loaded = client.load("mini", keep_alive=KEEP_ALIVE_FOREVER)
        assert client.load("other") == {**MODELS[0], "id": "other", "op": "load"}
        assert client.unload("mini")["op"] == "unload"
        assert client.pin("mini")["op"] == "pin"
        assert client.unpin("mini")["op"] == "unpin"
    assert loaded == {**MODELS[0], "op": "load"}
    assert [(r.op, r.fields) for r in daemon.requests] == [
        ("load", {"model": "mini", "keep_alive": -1}), ("load", {"model": "other"}), ("unload", {"model": "mini"}),
        ("pin", {"model": "mini"}), ("unpin", {"model": "mini"}),
    ]


def test_embed_sends_keep_alive_only_when_given(serve: Callable[..., StandIn]) -> None:
    daemon = serve()
    with Client(daemon.path, timeout=0.5) as client:
        client.embed("x", keep_alive=0)
        client.embed("x", keep_alive=2.5)
        client.embed("x")
    assert [r.fields.get("keep_alive", "absent") for r in daemon.requests] == [0, 2.5, "absent"]


def test_async_model_ops_and_embed_keep_alive(serve: Callable[..., StandIn]) -> None:
    daemon = serve()

    async def run() -> list:
        async with AsyncClient(daemon.path, timeout=0.5) as client:
            await client.embed(["a"], keep_alive=KEEP_ALIVE_FOREVER)
            return [await client.load("mini", 60), await client.unload("mini"),
                    await client.pin("mini"), await client.unpin("mini")]

    assert [m["op"] for m in asyncio.run(run())] == list(MODEL_OPS)
    assert [(r.op, r.fields.get("keep_alive")) for r in daemon.requests] == [
        ("embed", -1), ("load", 60), ("unload", None), ("pin", None), ("unpin", None)]
    assert all(r.fields["model"] == "mini" for r in daemon.requests[1:])


def test_load_errors(serve: Callable[..., StandIn]) -> None:
    def refuse(request: Request) -> list[bytes] | None:
        if request.fields["model"] == "huge":
            return encode_error(request.id, InsufficientMemory("model 'huge' needs 9000 MB; 2048 MB free"))
        if request.fields["model"] == "slow":
            return None  # still loading when the client gives up
        return encode_result(request.id, {"pong": True})  # a reply without the model

    daemon = serve(refuse)
    with Client(daemon.path, timeout=0.2, retries=1) as client:
        with pytest.raises(InsufficientMemory, match="9000 MB"):
            client.load("huge")
        with pytest.raises(Unavailable, match="pass a larger timeout"):
            client.load("slow")
        with pytest.raises(InternalError, match="no model description"):
            client.pin("mini")

    async def run() -> None:
        async with AsyncClient(daemon.path, timeout=0.2, retries=1) as client:
            await client.load("huge")

    with pytest.raises(InsufficientMemory):
        asyncio.run(run())


def test_retries_after_the_first_request_is_dropped(serve: Callable[..., StandIn]) -> None:
    daemon = serve(lambda request: None if len(daemon.requests) == 1 else answer(request))
    with Client(daemon.path, timeout=0.3, retries=3) as client:
        vectors = client.embed(["again"])
    np.testing.assert_array_equal(vectors[0], vector("again"))
    assert len(daemon.requests) == 2 and daemon.requests[0].id == daemon.requests[1].id


def test_no_daemon_is_unavailable_after_every_retry(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    started = time.monotonic()
    with Client(path, timeout=0.2, retries=3) as client, pytest.raises(Unavailable) as caught:
        client.ping()
    elapsed = time.monotonic() - started
    assert 0.55 < elapsed < 1.5
    message = caught.value.message
    assert str(path) in message and "3 tries" in message and "systemctl status akidb-embed" in message


def test_reply_with_another_id_is_discarded(serve: Callable[..., StandIn]) -> None:
    def wrong_then_right(request: Request) -> list[bytes]:
        first = len(daemon.requests) == 1
        return encode_result("someone-else", {"pong": "wrong"}) if first else answer(request)

    daemon = serve(wrong_then_right)
    with Client(daemon.path, timeout=0.5) as client:
        assert client.ping() == {"pong": True}
    assert len(daemon.requests) == 2


def test_socket_defaults_to_the_environment(serve: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = serve()
    monkeypatch.setenv("AKIDB_EMBED_SOCKET", str(daemon.path))
    with Client(timeout=0.5) as client:
        assert client.socket_path == str(daemon.path)
        assert client.ping() == {"pong": True}
    monkeypatch.delenv("AKIDB_EMBED_SOCKET")
    assert Client().socket_path == "/run/akidb-embed/embed.sock"


def test_async_concurrent_embeds_get_their_own_answers(serve: Callable[..., StandIn]) -> None:
    daemon = serve(batch=20)  # answers only once all 20 are in, last first
    texts = [f"text number {i}" + "!" * i for i in range(20)]

    async def run() -> list[Embeddings]:
        async with AsyncClient(daemon.path, timeout=2.0) as client:
            return await asyncio.gather(*(client.embed(text) for text in texts))

    results = asyncio.run(run())
    for text, vectors in zip(texts, results):
        np.testing.assert_array_equal(vectors, [vector(text)])
        assert vectors.model == "mini"
    assert len({r.id for r in daemon.requests}) == 20


def test_async_resends_and_ignores_duplicate_replies(serve: Callable[..., StandIn]) -> None:
    # Each reply is held until a second request comes in: the client must time out and resend,
    # then gets two replies with its id and must take one and ignore the other.
    daemon = serve(batch=2)

    async def run() -> tuple[dict, dict]:
        async with AsyncClient(daemon.path, timeout=0.3, retries=3) as client:
            first = await client.ping()
            return first, await client.status()

    assert asyncio.run(run()) == ({"pong": True}, STATUS)
    assert [r.op for r in daemon.requests] == ["ping", "ping", "status", "status"]
    assert daemon.requests[0].id == daemon.requests[1].id != daemon.requests[2].id


def test_async_without_daemon_is_unavailable(tmp_path: Path) -> None:
    async def run() -> None:
        async with AsyncClient(tmp_path / "nobody.sock", timeout=0.2, retries=2) as client:
            await client.embed(["x"])

    started = time.monotonic()
    with pytest.raises(Unavailable, match="2 tries"):
        asyncio.run(run())
    assert 0.35 < time.monotonic() - started < 1.2


def run_cli(argv: list[str]) -> int:
    """Parse argv with the client commands and run the chosen one."""
    parser = argparse.ArgumentParser(prog="akidb-embed")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_embed_prints_table_and_similarity(
    serve: Callable[..., StandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = serve()
    long_text = "a rather long sentence that will not fit in the text column at all"
    assert run_cli(["embed", "hello", long_text, "--socket", str(daemon.path), "--timeout", "0.5",
                    "--model", "mini", "--dimensions", "3", "--no-normalize"]) == 0
    out = capsys.readouterr().out
    assert "text" in out and "norm" in out and "hello" in out and "mini" in out
    assert long_text not in out and long_text[:30] in out
    assert "cosine similarity" in out and "+1.0000" in out
    assert daemon.requests[0].fields["dimensions"] == 3 and daemon.requests[0].fields["normalize"] is False


def test_cli_embed_json(serve: Callable[..., StandIn], capsys: pytest.CaptureFixture[str]) -> None:
    daemon = serve()
    assert run_cli(["embed", "one", "--json", "--socket", str(daemon.path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "mini" and data["embeddings"][0]["vector"] == vector("one")


def test_cli_models_table(serve: Callable[..., StandIn], capsys: pytest.CaptureFixture[str]) -> None:
    long_id = "multilingual-e5-large-instruct-int8-onnx"  # 40 characters
    models = [*MODELS, {"id": long_id, "state": "available", "dimension": 1024, "memory_mb": 1120.0,
                        "memory_source": "file size", "error": "x" * 200}]

    def fresh(request: Request) -> list[bytes]:  # last used 12 s before the reply
        return encode_result(request.id, {"models": [{**models[0], "last_used": time.time() - 12}, *models[1:]]})

    daemon = serve(fresh)
    assert run_cli(["models", "--socket", str(daemon.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("  ")[:2] == ["id", ""] and [h.strip() for h in lines[0].split("  ") if h.strip()] == [
        "id", "state", "verified", "pinned", "memory", "last used", "requests", "p95", "texts/s", "dim", "default"]
    never = modeltable.NEVER  # no profile: not measured, not guessed
    assert lines[2].split() == ["mini", "ready", "yes", "*", "87", "MB", "12s", "ago", "41", never, never, "3", "*"]
    assert lines[3].split() == ["broken", "failed", "-", "~90", "MB", "-", "0", never, never, "8"]  # an older daemon's reply
    assert lines[4].split() == [long_id, "available", "-", "~1120", "MB", "-", "-", never, never, "1024"]
    assert lines[6] == "broken: model.onnx is missing" and lines[7].startswith(f"{long_id}: xxx")
    assert max(len(line) for line in lines[:5]) <= 140  # with a 40-character id; --wide has the rest
    assert run_cli(["models", "--wide", "--socket", str(daemon.path)]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert all(h in wide[0] for h in ("weights/work/peak", "in-flight", "qps", "hit rate", "cold load", "quality"))
    assert "23/64/52 MB" in wide[2]
    assert run_cli(["models", "--json", "--socket", str(daemon.path)]) == 0
    assert json.loads(capsys.readouterr().out)[1] == MODELS[1]


def test_cli_models_table_units() -> None:
    assert modeltable.ago(None, 100.0) == "-" and modeltable.ago(100.0, 99.0) == "0s ago"
    assert [modeltable.ago(0, s) for s in (59.9, 60, 7199, 86400 * 3)] == ["59s ago", "1m ago", "1h ago", "3d ago"]
    assert modeltable.models_table([]) == "no models in the catalog"


def test_cli_status_shows_memory_first_in_human_units(
    serve: Callable[..., StandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = serve()
    assert run_cli(["status", "--socket", str(daemon.path)]) == 0
    lines = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
    assert lines[:5] == [["memory.source", "tegrastats+meminfo"], ["memory.pressure", "75.0%"],
                         ["memory.used", "6.0 GiB"], ["memory.available", "2.0 GiB"], ["memory.total", "8.0 GiB"]]
    assert [key for key, _ in lines[5:8]] == ["memory.own_rss", "memory.swap_used", "memory.swap_total"]
    values = dict(lines)
    assert values["memory.own_rss"] == "412 MiB" and values["memory.swap_used"] == "0 MiB"
    assert values["memory.lfb_mb"] == "1.8 GiB" and values["budget.model_memory_mb"] == "2.0 GiB"
    assert values["budget.loaded_memory_mb"] == "87 MiB" and values["budget.max_loaded_models"] == "2"
    assert values["budget.high_watermark"] == "85.0%" and values["evictions"] == "3"
    assert values["models.ready"] == "1" and values["uptime_s"] == "1.5" and values["queue"] == "-"


def test_cli_model_commands(
    serve: Callable[..., StandIn], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts: list[float] = []

    class Recording(Client):
        def __init__(self, socket: str, timeout: float) -> None:
            timeouts.append(timeout)
            super().__init__(socket, timeout=timeout)

    monkeypatch.setattr(cli, "Client", Recording)
    daemon = serve()
    socket = ["--socket", str(daemon.path)]
    assert run_cli(["load", "mini", "--keep-alive", "5m", *socket]) == 0
    assert capsys.readouterr().out == (
        "mini: ready, pinned, memory 87 MB (measured), load 412 ms, keep-alive 300s\n")
    assert run_cli(["load", "mini", "--keep-alive", "forever", *socket]) == 0
    assert run_cli(["load", "mini", "--timeout", "7", *socket]) == 0
    for op in ("unload", "pin", "unpin"):
        assert run_cli([op, "e5", *socket]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[3].startswith("e5: ready, pinned, memory 87 MB")
    assert [(r.op, r.fields) for r in daemon.requests] == [
        ("load", {"model": "mini", "keep_alive": 300.0}), ("load", {"model": "mini", "keep_alive": -1.0}),
        ("load", {"model": "mini"}), ("unload", {"model": "e5"}), ("pin", {"model": "e5"}), ("unpin", {"model": "e5"}),
    ]
    assert timeouts == [cli.LOAD_TIMEOUT, cli.LOAD_TIMEOUT, 7.0, 10.0, 10.0, 10.0]
    assert run_cli(["pin", "mini", "--json", *socket]) == 0
    assert json.loads(capsys.readouterr().out) == {**MODELS[0], "op": "pin"}
    described = modeltable.model_summary({"id": "big", "state": "available", "pinned": False, "memory_mb": 900,
                                          "memory_source": "manifest", "keep_alive": -1, "error": "no room"})
    assert described == (
        "big: available, not pinned, memory ~900 MB (manifest), load -, keep-alive forever; error: no room")
    assert modeltable.memory_cell({"memory_mb": 0.0, "memory_source": "unknown"}) == "-"


@pytest.mark.parametrize("text", ["soon", "5x", "nan", "inf", ""])
def test_cli_keep_alive_rejects_non_durations(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(["load", "mini", "--keep-alive", text])
    assert "is not a duration" in capsys.readouterr().err
    assert [cli.seconds(t) for t in ("30", "1.5m", "2h", "1d", "-1", "0")] == [30, 90, 7200, 86400, -1, 0]


def test_cli_embed_keep_alive(serve: Callable[..., StandIn], capsys: pytest.CaptureFixture[str]) -> None:
    daemon = serve()
    assert run_cli(["embed", "x", "--keep-alive", "0", "--socket", str(daemon.path)]) == 0
    assert daemon.requests[0].fields["keep_alive"] == 0


def test_cli_errors_exit_codes(
    serve: Callable[..., StandIn], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = serve(lambda request: encode_error(request.id, UnknownModel("no model 'nope'")))
    assert run_cli(["embed", "x", "--model", "nope", "--socket", str(daemon.path)]) == 2
    assert capsys.readouterr().err.strip() == "error [unknown_model]: no model 'nope'"
    assert run_cli(["status", "--socket", str(tmp_path / "nobody.sock"), "--timeout", "0.1"]) == 3
    assert capsys.readouterr().err.startswith("error [unavailable]: no reply")
