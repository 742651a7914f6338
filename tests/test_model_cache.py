"""The memory-bounded model cache, through a real daemon: LRU eviction, pins, refusals, keep_alive,
pressure from a tegrastats stand-in, memory really released, and state kept across restarts."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import msgpack
import pytest
import tinymodels
import zmq
from akidb_embed.manifest import fingerprint, load_manifest
from akidb_embed_client import errors
from daemon_process import SEEDED_TUNING, Daemon, run_daemon, wait_for

BIN = Path(__file__).parent / "bin"
MB = 1 << 20


def states(daemon: Daemon) -> dict[str, str]:
    with daemon.client() as client:
        return {m["id"]: m["state"] for m in client.models()}


def seed_footprints(state_dir: Path, catalog: Path, mb: int) -> None:
    """A state file saying each model in the catalog measured ``mb`` MiB (weights + a 64 MiB working budget),
    as a previous run would leave."""
    records = {}
    for path in catalog.glob("*.toml"):
        manifest = load_manifest(path)
        measured = {"weights": (mb - 64) * MB, "work": 64 * MB, "peak": 0, "token_bytes": 0.0, "pair_bytes": 0.0, "work_mb": 0,
                    "tuning": SEEDED_TUNING}
        records[manifest.id] = {"fingerprint": fingerprint(manifest), "footprint": mb * MB, "memory": measured}
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps({"models": records, "warm": []}))


@pytest.fixture
def big_catalog(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three ids on one encoder of hidden size 1024 (~14 MB of weights): slow enough to be in flight."""
    model = tmp_path_factory.mktemp("big") / "encoder"
    tinymodels.build_encoder(model, hidden=1024)
    catalog = tmp_path / "models.d"
    for model_id in ("a", "b", "c"):
        tinymodels.write_manifest(catalog, model_id, model, **{**tinymodels.BGE_FIELDS, "dimension": 1024})
    return catalog


def test_lru_order_under_a_count_cap(catalog: Path) -> None:
    """1. cap 2  2. use bge, e5, then bge again  3. qwen3 evicts e5, the least recently used."""
    with run_daemon(catalog, memory={"max_loaded_models": 2}) as daemon, daemon.client() as client:
        for model in ("bge-tiny", "e5-tiny", "bge-tiny", "qwen3-tiny"):
            client.embed("x", model=model)
        assert states(daemon) == {"bge-tiny": "ready", "e5-tiny": "available", "qwen3-tiny": "ready"}
        assert client.status()["evictions"] == 1
        assert "model e5-tiny: unloading (least recently used, to make room for qwen3-tiny)" in daemon.log()


def test_lru_order_under_a_memory_budget(tmp_path: Path, catalog: Path) -> None:
    """1. each model measured 100 MiB, budget 250 MiB  2. two fit  3. the third evicts the least recent."""
    state_dir = tmp_path / "state"
    seed_footprints(state_dir, catalog, 100)
    with run_daemon(catalog, state_dir=str(state_dir), memory={"model_memory_mb": 250}) as daemon:
        with daemon.client() as client:
            client.embed("x", model="e5-tiny")
            client.embed("x", model="qwen3-tiny")
            client.embed("x", model="bge-tiny")
            budget = client.status()["budget"]
        assert states(daemon) == {"bge-tiny": "ready", "e5-tiny": "available", "qwen3-tiny": "ready"}
        assert budget["loaded_models"] == 2 and budget["loaded_memory_mb"] == pytest.approx(200, abs=1)


def test_a_pinned_model_survives(catalog: Path) -> None:
    with run_daemon(catalog, memory={"max_loaded_models": 2}) as daemon, daemon.client() as client:
        assert client.pin("bge-tiny")["pinned"] is True
        client.embed("x", model="e5-tiny")
        client.embed("x", model="qwen3-tiny")  # bge is least recent, but pinned: e5 goes
        assert states(daemon)["bge-tiny"] == "ready" and states(daemon)["e5-tiny"] == "available"
        client.unpin("bge-tiny")
        client.embed("x", model="e5-tiny")  # now bge is the least recent and may go
        assert states(daemon)["bge-tiny"] == "available"


def test_a_model_in_use_is_not_evicted(big_catalog: Path) -> None:
    """1. cap 1, a slow request on `a` in flight  2. `b` is refused, not `a` evicted  3. after it, `b` loads."""
    with run_daemon(big_catalog, memory={"max_loaded_models": 1}, limits={"max_batch": 8}) as daemon:
        with daemon.client() as client:
            client.load("a")
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.connect(f"ipc://{daemon.socket}")
        slow = msgpack.packb({"v": 1, "id": "slow", "op": "embed", "model": "a", "texts": ["word " * 500] * 96})
        socket.send_multipart([b"", slow])
        with daemon.client() as client:
            wait_for(lambda: client.models()[0]["in_flight"] == 1)
            with pytest.raises(errors.InsufficientMemory, match="in use or pinned"):
                client.embed("x", model="b")
            assert socket.poll(60000)
            reply = msgpack.unpackb(socket.recv_multipart()[1], raw=False)
            assert reply["ok"] and reply["shape"] == [96, 1024]
            assert client.embed("x", model="b").model == "b"
        socket.close(linger=0)
        assert states(daemon) == {"a": "available", "b": "ready", "c": "available"}


def test_refusal_when_nothing_can_make_room(tmp_path: Path, catalog: Path) -> None:
    state_dir = tmp_path / "state"
    seed_footprints(state_dir, catalog, 100)
    with run_daemon(catalog, state_dir=str(state_dir), memory={"model_memory_mb": 50}) as daemon:
        with daemon.client() as client:
            with pytest.raises(errors.InsufficientMemory, match=r"needs ~100 MiB .* memory.model_memory_mb = 50"):
                client.embed("x", model="bge-tiny")
            assert client.ping()["pong"] and states(daemon)["bge-tiny"] == "available"


def test_concurrent_first_requests_cause_one_load(catalog: Path) -> None:
    with run_daemon(catalog) as daemon:
        def first_request() -> None:
            with daemon.client() as client:
                client.embed("x", model="e5-tiny")

        threads = [threading.Thread(target=first_request) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert daemon.log().count("model e5-tiny: loaded in") == 1


def test_keep_alive_from_request_and_manifest(catalog: Path, tiny_models: dict[str, Path]) -> None:
    tinymodels.write_manifest(catalog, "brief", tiny_models["encoder"], **tinymodels.BGE_FIELDS, keep_alive=1)
    with run_daemon(catalog, memory={"check_seconds": 0.2}) as daemon, daemon.client() as client:
        client.embed("x", model="e5-tiny", keep_alive=0)
        wait_for(lambda: states(daemon)["e5-tiny"] == "available", timeout=5)
        client.embed("x", model="brief")
        client.embed("x", model="bge-tiny")  # the daemon's default keep_alive: 300 s
        wait_for(lambda: states(daemon)["brief"] == "available", timeout=5)
        assert "idle for 1 s, keep_alive 1 s" in daemon.log() or "keep_alive 1 s" in daemon.log()
        assert states(daemon)["bge-tiny"] == "ready"


def test_pressure_from_another_app_evicts_idle_models(tmp_path: Path, catalog: Path) -> None:
    """1. tegrastats says RAM is mostly free  2. load two models  3. RAM fills up: the daemon evicts and says so."""
    ram = tmp_path / "ram"
    ram.write_text("2000/62841")
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "TEGRASTATS_RAM_FILE": str(ram)}
    memory = {"tegrastats": "auto", "tegrastats_interval_ms": 100, "check_seconds": 0.2}
    with run_daemon(catalog, env=env, memory=memory) as daemon, daemon.client() as client:
        wait_for(lambda: "tegrastats" in client.status()["memory"]["source"])
        client.embed("x", model="bge-tiny")
        client.embed("x", model="e5-tiny")
        ram.write_text("62800/62841")  # another app grew: 41 MiB left
        wait_for(lambda: client.status()["evictions"] == 2)
        assert "memory pressure" in daemon.log() and "over the high watermark" in daemon.log()
        assert states(daemon)["bge-tiny"] == "available" and states(daemon)["e5-tiny"] == "available"
        wait_for(lambda: "no idle unpinned model to evict" in daemon.log())
        time.sleep(0.6)  # three more rounds under pressure with nothing left to evict: said once
        assert daemon.log().count("no idle unpinned model to evict") == 1
        with pytest.raises(errors.InsufficientMemory, match="the system has 0 MiB to spare"):
            client.embed("x", model="qwen3-tiny")
        ram.write_text("2000/62841")
        wait_for(lambda: client.status()["memory"]["pressure"] < 0.5)
        assert client.embed("x", model="qwen3-tiny").model == "qwen3-tiny"


def test_load_unload_cycles_give_memory_back(big_catalog: Path) -> None:
    """50 load/unload cycles of a 14 MB model leave RSS within 10 % of where it started."""
    with run_daemon(big_catalog) as daemon, daemon.client() as client:
        client.load("a")
        client.unload("a")
        wait_for(lambda: states(daemon)["a"] == "available")
        before = client.status()["memory"]["own_rss"]
        for _ in range(50):
            assert client.load("a")["state"] == "ready"
            client.unload("a")
        wait_for(lambda: states(daemon)["a"] == "available")
        after = client.status()["memory"]["own_rss"]
    assert abs(after - before) <= 0.10 * before, (before / MB, after / MB)


def test_warm_and_pinned_models_come_back_after_a_restart(tmp_path: Path, catalog: Path) -> None:
    """1. pin qwen3, use e5  2. restart with the same state  3. ready first, then both reload by themselves."""
    state_dir = tmp_path / "state"
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon, daemon.client() as client:
        client.pin("qwen3-tiny")
        client.embed("x", model="e5-tiny")
        measured = {m["id"]: m["memory_mb"] for m in client.models()}
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon:
        wait_for(lambda: states(daemon)["qwen3-tiny"] == "ready" and states(daemon)["e5-tiny"] == "ready")
        assert states(daemon)["bge-tiny"] == "available"
        with daemon.client() as client:
            models = {m["id"]: m for m in client.models()}
        assert models["qwen3-tiny"]["pinned"] is True
        assert models["e5-tiny"]["memory_mb"] >= measured["e5-tiny"] * 0.5
        log = daemon.log()
        assert log.index("ready (pid") < log.index("model qwen3-tiny: loaded in") < log.index("model e5-tiny: loaded in")


def test_loading_a_loaded_model_and_bad_requests_cause_no_load(catalog: Path) -> None:
    with run_daemon(catalog) as daemon, daemon.client() as client:
        client.load("e5-tiny")
        client.load("e5-tiny")
        client.pin("e5-tiny")
        assert daemon.log().count("model e5-tiny: loaded in") == 1
        with pytest.raises(errors.BadRequest):
            client.embed("x", model="qwen3-tiny", dimensions=7)
        assert states(daemon)["qwen3-tiny"] == "available"


def test_a_refused_request_leaves_keep_alive_as_it_was(daemon: Daemon) -> None:
    with daemon.client() as client:
        client.embed("x", model="e5-tiny", keep_alive=120)
        for loaded in (True, False):
            with pytest.raises(errors.BadRequest):
                client.embed("x", model="e5-tiny", keep_alive=5, dimensions=7)
            keep_alive = next(m["keep_alive"] for m in client.models() if m["id"] == "e5-tiny")
            assert keep_alive == (120 if loaded else 300)
            client.unload("e5-tiny")
