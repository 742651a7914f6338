"""The watched catalog, through a real daemon and real files: hot-add, hot-swap, removal, careless writers."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import msgpack
import pytest
import tinymodels
import zmq
from akidb_embed_client import Client, errors
from daemon_process import Daemon, wait_for

FIELDS = {**tinymodels.BGE_FIELDS}


def models(daemon: Daemon) -> dict[str, dict]:
    with daemon.client() as client:
        return {m["id"]: m for m in client.models()}


def place(catalog: Path, model_id: str, model_dir: Path, **fields) -> None:
    """Write a manifest beside the catalog and rename it into place, the documented way."""
    staging = tinymodels.write_manifest(catalog.parent / "staging", model_id, model_dir, **{**FIELDS, **fields})
    text = staging.read_text().replace("../", "../")  # same relative depth: staging is the catalog's sibling
    tmp = catalog / f".{model_id}.toml.tmp"
    tmp.write_text(text)
    os.replace(tmp, catalog / f"{model_id}.toml")


@pytest.fixture
def other_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encoder with other weights: a new version of a model, with another fingerprint."""
    path = tmp_path_factory.mktemp("other") / "encoder"
    tinymodels.build_encoder(path, seed=1)
    return path


def test_a_manifest_renamed_into_place_is_listed_within_a_second_and_serves(
    daemon: Daemon, tiny_models: dict[str, Path]
) -> None:
    """The watcher's promise is timed (a second, with its 0.15 s debounce); the first load that follows is not:
    it measures the new version in a child process, which a busy machine slows by seconds."""
    started = time.monotonic()
    place(daemon.catalog, "hot", tiny_models["encoder"])
    with daemon.client(timeout=30) as client:
        while "hot" not in {m["id"] for m in client.models()}:
            assert time.monotonic() - started < 1.0, "not listed within 1 s"
            time.sleep(0.01)
        assert client.embed("hot add", model="hot").model == "hot"


def test_atomic_replace_swaps_while_clients_embed_without_an_error(
    daemon: Daemon, tiny_models: dict[str, Path], other_encoder: Path
) -> None:
    """1. 4 clients embed on `swap` nonstop  2. its manifest is replaced  3. replies move to the new fingerprint, none fails."""
    place(daemon.catalog, "swap", tiny_models["encoder"])
    wait_for(lambda: "swap" in models(daemon))
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def client_loop() -> None:
        try:
            with Client(daemon.socket, timeout=10, retries=1) as client:
                while not stop.is_set():
                    seen.append(client.embed(["keep embedding", "please"], model="swap").fingerprint)
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(seen) > 20)
    old = seen[0]
    place(daemon.catalog, "swap", other_encoder)
    wait_for(lambda: seen[-1] != old)
    after = len(seen)
    wait_for(lambda: len(seen) > after + 20)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    assert len(set(seen)) == 2 and all(f != old for f in seen[after + 4 :])
    assert "model swap: swapped to fingerprint" in daemon.log()


def test_a_partial_write_never_replaces_the_working_version(
    daemon: Daemon, tiny_models: dict[str, Path], other_encoder: Path
) -> None:
    """1. a serving model's manifest is rewritten in two pieces  2. between them the old version serves  3. then the new."""
    place(daemon.catalog, "careless", tiny_models["encoder"])
    with daemon.client() as client:
        wait_for(lambda: "careless" in models(daemon))
        old = client.embed("x", model="careless").fingerprint
        path = daemon.catalog / "careless.toml"
        full = tinymodels.write_manifest(daemon.catalog.parent / "staging", "careless", other_encoder, **FIELDS).read_text()
        path.write_text(full[: len(full) // 2])  # cp, half-way
        wait_for(lambda: models(daemon)["careless"]["update_error"] is not None)
        assert models(daemon)["careless"]["state"] == "ready"
        assert client.embed("x", model="careless").fingerprint == old
        path.write_text(full)  # ... and finished
        wait_for(lambda: client.embed("x", model="careless").fingerprint != old)
        assert models(daemon)["careless"]["update_error"] is None


def test_a_new_manifest_written_in_pieces_is_listed_with_its_error_then_serves(
    daemon: Daemon, tiny_models: dict[str, Path]
) -> None:
    text = tinymodels.write_manifest(daemon.catalog.parent / "staging", "pieces", tiny_models["encoder"], **FIELDS).read_text()
    path = daemon.catalog / "pieces.toml"
    path.write_text(text[:20])
    wait_for(lambda: models(daemon).get("pieces", {}).get("state") == "invalid")
    with daemon.client() as client:
        assert client.embed("others serve", model="e5-tiny").model == "e5-tiny"
        path.write_text(text)
        wait_for(lambda: models(daemon)["pieces"]["state"] == "available")
        assert client.embed("x", model="pieces").model == "pieces"


def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving(daemon: Daemon, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["encoder"], broken)
    (broken / "model.onnx").write_bytes(b"not onnx at all")
    place(daemon.catalog, "stays", tiny_models["encoder"])
    with daemon.client() as client:
        wait_for(lambda: "stays" in models(daemon))
        old = client.embed("x", model="stays").fingerprint
        place(daemon.catalog, "stays", broken)
        wait_for(lambda: models(daemon)["stays"]["update_error"] is not None)
        assert "onnxruntime cannot load" in models(daemon)["stays"]["update_error"]
        assert client.embed("x", model="stays").fingerprint == old


def test_a_replaced_model_file_swaps_the_model(daemon: Daemon, tiny_models: dict[str, Path], other_encoder: Path, tmp_path: Path) -> None:
    own = tmp_path / "own"
    shutil.copytree(tiny_models["encoder"], own)
    place(daemon.catalog, "file-swap", own)
    with daemon.client() as client:
        wait_for(lambda: "file-swap" in models(daemon))
        old = client.embed("x", model="file-swap").fingerprint
        shutil.copy(other_encoder / "model.onnx", own / ".model.onnx.part")
        os.replace(own / ".model.onnx.part", own / "model.onnx")
        wait_for(lambda: client.embed("x", model="file-swap").fingerprint != old)


def test_deletion_lets_requests_in_flight_finish(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    """1. a slow request on `leaving` in flight  2. its manifest is deleted  3. it finishes; new requests: unknown_model."""
    place(daemon.catalog, "leaving", tiny_models["encoder"])
    wait_for(lambda: "leaving" in models(daemon))
    with daemon.client() as client:
        client.load("leaving")
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(f"ipc://{daemon.socket}")
    texts = ["word " * 500] * 16  # the daemon's limit is 16 texts a request
    total = 60
    for i in range(total):
        socket.send_multipart([b"", msgpack.packb({"v": 1, "id": i, "op": "embed", "model": "leaving", "texts": texts})])
    wait_for(lambda: models(daemon)["leaving"]["in_flight"] > 0)
    (daemon.catalog / "leaving.toml").unlink()
    replies = []
    while "leaving" in models(daemon):
        while socket.poll(0):
            replies.append(msgpack.unpackb(socket.recv_multipart()[1], raw=False))
    retired_with = total - len(replies)
    while len(replies) < total and socket.poll(30000):
        replies.append(msgpack.unpackb(socket.recv_multipart()[1], raw=False))
    socket.close(linger=0)
    assert retired_with > 0, "all requests finished before the removal: nothing was in flight"
    assert len(replies) == total and all(r["ok"] for r in replies), [r.get("message") for r in replies if not r["ok"]]
    with daemon.client() as client, pytest.raises(errors.UnknownModel):
        client.embed("x", model="leaving")


def test_a_rescan_reaches_the_watchers_state(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    place(daemon.catalog, "one", tiny_models["encoder"])
    (daemon.catalog / "e5-tiny.toml").unlink()
    wait_for(lambda: "one" in models(daemon) and "e5-tiny" not in models(daemon))
    before = {k: (v["state"], v.get("fingerprint")) for k, v in models(daemon).items()}
    daemon.signal(signal.SIGHUP)
    time.sleep(0.3)
    assert {k: (v["state"], v.get("fingerprint")) for k, v in models(daemon).items()} == before


def test_a_pinned_manifest_dropped_in_loads_by_itself(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    place(daemon.catalog, "always", tiny_models["encoder"], pinned=True)
    wait_for(lambda: models(daemon).get("always", {}).get("state") == "ready")
    assert models(daemon)["always"]["pinned"] is True


def test_disabling_a_loaded_model_unloads_it(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    place(daemon.catalog, "switch", tiny_models["encoder"])
    with daemon.client() as client:
        wait_for(lambda: "switch" in models(daemon))
        client.load("switch")
        place(daemon.catalog, "switch", tiny_models["encoder"], enabled=False)
        wait_for(lambda: models(daemon)["switch"]["state"] == "disabled")
        assert "fingerprint" not in models(daemon)["switch"]
        with pytest.raises(errors.ModelUnavailable, match="disabled"):
            client.embed("x", model="switch")
