"""The circuit breaker: the state machine on a fake clock, then through a real daemon with real broken models.

The daemon tests run with backoffs of a fraction of a second. Their broken models are real: an ONNX file of
garbage (its load fails), and a tiny encoder whose graph fails at run time for some texts (a
Gather out of bounds for one word), so that inference fails for texts with that word and works for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import onnx
import pytest
import tinymodels
import zmq
from akidb_embed_client import errors
from daemon_process import Daemon, run_daemon, wait_for
from onnx import helper, numpy_helper
from tokenizers import Tokenizer

from akidb_embed.circuit import CLOSED, HALF_OPEN, OPEN, TRIAL_RETRY_MS, Circuit
from akidb_embed.settings import CircuitSettings

SETTINGS = CircuitSettings(failures=3, backoff_seconds=30, max_backoff_seconds=100)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def circuit(clock: FakeClock) -> tuple[Circuit, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    return Circuit("m", SETTINGS, lambda event, **fields: events.append((event, fields)), clock), events


def _refused_after(circuit: Circuit) -> int:
    """The retry_after_ms an admission is refused with."""
    with pytest.raises(errors.ModelUnavailable) as caught:
        circuit.admit()
    assert caught.value.retry_after == caught.value.details["retry_after_ms"] / 1e3
    return caught.value.details["retry_after_ms"]


def test_inference_failures_open_it_after_enough_in_a_row(circuit, clock: FakeClock) -> None:
    breaker, events = circuit
    breaker.failed("boom 1")
    breaker.failed("boom 2")
    breaker.succeeded()  # a success breaks the run
    breaker.failed("boom 3")
    breaker.failed("boom 4")
    assert breaker.state == CLOSED and breaker.failures == 2 and not events
    breaker.admit()
    breaker.failed("boom 5")
    assert breaker.state == OPEN
    assert events == [("circuit_opened", {"error": "boom 5", "retry_after_ms": 30000})]
    assert _refused_after(breaker) == 30000
    clock.now += 10
    assert _refused_after(breaker) == 20000
    assert breaker.describe() == {"state": OPEN, "failures": 3, "retry_after_ms": 20000, "last_error": "boom 5"}


def test_a_load_failure_opens_it_at_once_and_names_the_cause(circuit) -> None:
    breaker, events = circuit
    breaker.failed("its load failed: no such file", at_once=True)
    with pytest.raises(errors.ModelUnavailable, match="no such file.*circuit is open: tried again in 30.0 s"):
        breaker.admit()
    assert [event for event, _ in events] == ["circuit_opened"]


def test_after_the_backoff_one_trial_goes_through_and_the_others_wait_for_it(circuit, clock: FakeClock) -> None:
    breaker, events = circuit
    breaker.failed("bad", at_once=True)
    clock.now += 30
    breaker.admit()  # the trial
    assert breaker.state == HALF_OPEN
    assert _refused_after(breaker) == TRIAL_RETRY_MS
    assert breaker.describe()["retry_after_ms"] == TRIAL_RETRY_MS
    breaker.succeeded()
    assert breaker.state == CLOSED and breaker.failures == 0
    assert events[-1] == ("circuit_closed", {"reason": "the model served again"})
    assert breaker.describe() == {"state": CLOSED, "failures": 0, "retry_after_ms": None, "last_error": "bad"}
    breaker.admit()
    breaker.admit()


def test_each_failed_trial_doubles_the_backoff_up_to_the_cap(circuit, clock: FakeClock) -> None:
    breaker, events = circuit
    breaker.failed("bad", at_once=True)
    waits = []
    for _ in range(4):
        clock.now += breaker.backoff
        breaker.admit()
        breaker.failed("still bad")
        waits.append(_refused_after(breaker))
    assert waits == [60000, 100000, 100000, 100000]
    assert [fields["retry_after_ms"] for _, fields in events] == [30000, 60000, 100000, 100000, 100000]


def test_a_trial_that_proves_nothing_hands_the_trial_to_the_next_caller(circuit, clock: FakeClock) -> None:
    breaker, _ = circuit
    breaker.failed("bad", at_once=True)
    clock.now += 30
    breaker.admit()
    breaker.abandoned()
    assert breaker.state == OPEN and breaker.retry_after_ms() == 0
    breaker.admit()
    assert breaker.state == HALF_OPEN


def test_a_reset_closes_it_at_once(circuit) -> None:
    breaker, events = circuit
    breaker.failed("bad", at_once=True)
    breaker.reset("a new version")
    assert breaker.state == CLOSED and breaker.failures == 0
    assert events[-1] == ("circuit_closed", {"reason": "a new version"})
    breaker.admit()
    breaker.reset("again")  # closed already: nothing to say
    assert len(events) == 2


def test_a_request_counts_only_inference_failures(circuit) -> None:
    breaker, _ = circuit
    loop = asyncio.new_event_loop()
    try:
        def ended(outcome: BaseException | None) -> asyncio.Future:
            future = loop.create_future()
            if outcome is not None:
                future.set_exception(outcome)
            else:
                future.set_result("vectors")
            return future

        for own_fault in (errors.InputTooLong("long"), errors.Overloaded("busy"), errors.ShuttingDown("bye")):
            breaker.ran(ended(own_fault))
        breaker.ran(loop.create_future())  # never queued: submit refused it
        assert breaker.failures == 0
        for _ in range(3):
            breaker.ran(ended(errors.InternalError("inference failed on m: bad shape")))
        assert breaker.state == OPEN and breaker.last_error == "inference failed on m: bad shape"
    finally:
        loop.close()


# --- a real daemon -------------------------------------------------------------------------------------------

FIELDS = tinymodels.BGE_FIELDS
CIRCUIT = {"failures": 3, "backoff_seconds": 0.5, "max_backoff_seconds": 2}
POISON = "fox"  # a word of the tiny tokenizer's vocabulary on which the fragile encoder's inference fails


def _models(daemon: Daemon) -> dict[str, dict]:
    with daemon.client() as client:
        return {m["id"]: m for m in client.models()}


def _refusal(daemon: Daemon, model_id: str) -> errors.ModelUnavailable:
    with daemon.client() as client, pytest.raises(errors.ModelUnavailable) as caught:
        client.embed(["hello"], model=model_id)
    return caught.value


def _poisoned_encoder(model_dir: Path, out: Path) -> None:
    """A copy of the tiny encoder with the same vectors, whose graph fails at run time on texts holding POISON:
    its token's id maps to a row out of a one-row table's bounds (the load's warm-up and measurement never use it)."""
    shutil.copytree(model_dir, out)
    vocab = Tokenizer.from_file(str(out / tinymodels.TOKENIZER_FILE)).get_vocab()
    rows = np.zeros(len(vocab), np.int64)
    rows[vocab[POISON]] = 1_000_000
    model = onnx.load(str(out / tinymodels.MODEL_FILE))
    graph = model.graph
    (last,) = [node for node in graph.node if node.output[0] == "last_hidden_state"]
    last.output[0] = "clean_hidden"
    graph.initializer.extend([numpy_helper.from_array(rows, "poison_rows"),
                              numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero_row")])
    graph.node.extend([
        helper.make_node("Gather", ["poison_rows", "input_ids"], ["row_ids"]),
        helper.make_node("Gather", ["zero_row", "row_ids"], ["zeros"]),  # [batch, sequence, 1] of 0, or an error
        helper.make_node("Add", ["clean_hidden", "zeros"], ["last_hidden_state"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(out / tinymodels.MODEL_FILE))


@contextlib.contextmanager
def _subscribed(daemon: Daemon) -> Iterator[zmq.Socket]:
    """A SUB socket on the daemon's lifecycle events (beside its request socket), connected before it yields."""
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"model.circuit_")
    socket.connect(f"ipc://{daemon.socket.with_name('embed.events.sock')}")
    time.sleep(0.2)  # a subscription takes a moment to reach the publisher
    try:
        yield socket
    finally:
        socket.close(linger=0)


def _circuit_events(socket: zmq.Socket) -> list[dict]:
    """The circuit events published so far, in order."""
    events = []
    while socket.poll(200):
        events.append(msgpack.unpackb(socket.recv_multipart()[1], raw=False))
    return events


def _replace(target: Path, source: Path) -> None:
    """Drop a file in the documented way: copy beside it, then rename over it."""
    part = target.with_name(f".{target.name}.part")
    shutil.copy(source, part)
    os.replace(part, target)


def test_a_model_that_fails_to_load_backs_off_then_serves_once_fixed(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """1. a model whose ONNX file is garbage: the first request fails its load  2. the next are refused at once with
    retry_after_ms, without a load  3. past the backoff, one trial load fails and the backoff doubles  4. a valid
    ONNX file dropped in resets the circuit: the model serves, its circuit closed."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["encoder"], broken)
    (broken / tinymodels.MODEL_FILE).write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    catalog = tmp_path / "models.d"
    tinymodels.write_manifest(catalog, "broken", broken, **FIELDS)
    with run_daemon(catalog, circuit=CIRCUIT) as daemon, _subscribed(daemon) as events:
        first = _refusal(daemon, "broken")
        assert "onnxruntime cannot load" in first.message and 0 < first.retry_after <= 0.5
        loads = daemon.log().count("model broken: load failed")
        assert loads == 1
        refused = [_refusal(daemon, "broken") for _ in range(3)]
        assert all(0 < r.retry_after <= 0.5 and "circuit is open" in r.message for r in refused)
        assert daemon.log().count("model broken: load failed") == loads  # refused without a load
        info = _models(daemon)["broken"]
        assert info["state"] == "failed" and "onnxruntime cannot load" in info["error"]
        assert info["circuit"]["state"] == "open" and info["circuit"]["failures"] == 1
        assert "onnxruntime cannot load" in info["circuit"]["last_error"]

        time.sleep(0.5)  # the backoff passes: the next request is the trial load, which fails again
        trial = _refusal(daemon, "broken")
        assert "failed to load" in trial.message and 0.5 < trial.retry_after <= 1.0
        assert daemon.log().count("model broken: load failed") == 2
        circuit = _models(daemon)["broken"]["circuit"]
        assert circuit["state"] == "open" and circuit["failures"] == 2 and 0 < circuit["retry_after_ms"] <= 1000

        _replace(broken / tinymodels.MODEL_FILE, tiny_models["encoder"] / tinymodels.MODEL_FILE)
        wait_for(lambda: _models(daemon)["broken"]["circuit"]["state"] == "closed", timeout=5)
        with daemon.client() as client:
            assert client.embed(["fixed"], model="broken").model == "broken"
        info = _models(daemon)["broken"]
        assert info["state"] == "ready" and info["error"] is None and info["circuit"]["failures"] == 0
        assert "model broken: circuit closed: a new version" in daemon.log()
        published = _circuit_events(events)
    assert [event["event"] for event in published] == ["circuit_opened", "circuit_opened", "circuit_closed"]
    assert [event.get("retry_after_ms") for event in published] == [500, 1000, None]
    assert "onnxruntime cannot load" in published[0]["error"] and published[2]["reason"] == "a new version"


@pytest.fixture
def fragile(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A catalog of one model whose inference fails for texts holding POISON."""
    _poisoned_encoder(tiny_models["encoder"], tmp_path / "fragile")
    catalog = tmp_path / "models.d"
    tinymodels.write_manifest(catalog, "fragile", tmp_path / "fragile", **FIELDS)
    return catalog


BAD = "the quick brown fox jumps over the lazy dog"
GOOD = "the cat sleeps in the warm sun"


def test_inference_failures_in_a_row_open_the_circuit_and_a_good_trial_closes_it(fragile: Path) -> None:
    """1. a good text serves  2. three poisoned texts fail in inference (internal)  3. the circuit is open: even a
    good text is refused at once  4. past the backoff a good text is the trial; it serves, and the circuit closes."""
    with run_daemon(fragile, circuit=CIRCUIT) as daemon, daemon.client() as client:
        assert client.embed([GOOD], model="fragile").model == "fragile"
        for _ in range(3):
            with pytest.raises(errors.InternalError, match="inference failed on fragile"):
                client.embed([BAD], model="fragile")
        refused = _refusal(daemon, "fragile")
        assert "inference failed" in refused.message and 0 < refused.retry_after <= 0.5
        circuit = _models(daemon)["fragile"]["circuit"]
        assert circuit["state"] == "open" and circuit["failures"] == 3 and "inference failed" in circuit["last_error"]
        listed = subprocess.run([sys.executable, "-m", "akidb_embed", "models", "--socket", str(daemon.socket)],
                                capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
        assert "ready, circuit open" in listed
        time.sleep(0.5)
        assert client.embed([GOOD], model="fragile").model == "fragile"
        assert _models(daemon)["fragile"]["circuit"]["state"] == "closed"
        with pytest.raises(errors.InternalError):  # one failure after a close does not open it
            client.embed([BAD], model="fragile")
        assert client.embed([GOOD], model="fragile").model == "fragile"


def test_a_failed_trial_request_backs_off_further_and_an_explicit_load_resets_it(fragile: Path) -> None:
    """1. three failures open the circuit  2. past the backoff a poisoned text is the trial: it fails, the
    backoff doubles  3. a `load` closes the circuit at once: the model serves."""
    with run_daemon(fragile, circuit=CIRCUIT) as daemon, daemon.client() as client:
        for _ in range(3):
            with pytest.raises(errors.InternalError):
                client.embed([BAD], model="fragile")
        time.sleep(0.5)
        with pytest.raises(errors.InternalError):
            client.embed([BAD], model="fragile")
        assert 500 < _refusal(daemon, "fragile").details["retry_after_ms"] <= 1000
        assert client.load("fragile")["circuit"]["state"] == "closed"
        assert client.embed([GOOD], model="fragile").model == "fragile"
        assert "model fragile: circuit closed: a load was asked for" in daemon.log()
