"""Speed settings measured per model on this machine: threads and batch cut, stored with the
footprint, reused for the same fingerprint, measured again for a new one, for another configured
thread count, or on request. Real daemons and real ONNX Runtime sessions on the tiny encoder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tinymodels
from akidb_embed.backend import DeviceMemory, OnnxBackend
from akidb_embed.tokenize import Padded
from akidb_embed.tuning import thread_candidates, tune
from daemon_process import Daemon, run_daemon

MEASURING = "model enc: measuring its memory and speed settings"


class RecordingBackend:
    """A real session that also records the shape of every batch it runs."""

    def __init__(self, backend: OnnxBackend, shapes: list[tuple[int, int]]) -> None:
        self.backend, self.shapes, self.providers = backend, shapes, backend.providers

    def run(self, batch: Padded) -> object:
        self.shapes.append(batch.ids.shape)
        return self.backend.run(batch)


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    model = tmp_path / "encoder"
    tinymodels.build_encoder(model)
    catalog = tmp_path / "models.d"
    tinymodels.write_manifest(catalog, "enc", model, **tinymodels.BGE_FIELDS)
    return catalog


def described(daemon: Daemon) -> dict:
    with daemon.client() as client:
        client.embed("first use loads it", model="enc")
        return next(m for m in client.models() if m["id"] == "enc")


def recorded_tuning(state_dir: Path) -> dict:
    return json.loads((state_dir / "state.json").read_text())["models"]["enc"]["memory"]["tuning"]


def test_thread_candidates_span_one_to_every_core() -> None:
    """1 core: only 1  2. powers of two, half and all of the cores, ascending."""
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(6) == [1, 2, 3, 4, 6]
    assert thread_candidates(12) == [1, 2, 4, 6, 8, 12]


def test_tuning_times_only_batches_the_budget_allows(tmp_path: Path) -> None:
    """1. a rule allowing 4 rows and 64 padded tokens  2. every timed batch keeps to it
    3. threads are one of the candidates, the batch cut within the limit, the run cost not negative."""
    tinymodels.build_encoder(tmp_path)
    shapes: list[tuple[int, int]] = []

    def session_with(threads: int) -> RecordingBackend:
        backend = OnnxBackend(tmp_path / tinymodels.MODEL_FILE, ["cpu"], tmp_path, DeviceMemory(0, 0), threads)
        return RecordingBackend(backend, shapes)

    tuning = tune(session_with, list(range(5, 105)), lambda rows, n: rows <= 4 and rows * n <= 64, 0, 64)
    assert shapes and all(rows <= 4 and rows * n <= 64 for rows, n in shapes)
    assert tuning.threads in thread_candidates(len(os.sched_getaffinity(0)))
    assert 0 < tuning.batch_tokens <= 64 and tuning.run_cost_tokens >= 0 and tuning.threads_setting == 0


def test_tuning_is_kept_per_fingerprint_and_redone_for_a_new_one(tmp_path: Path, catalog: Path) -> None:
    """1. first load measures and shows the settings  2. a restart reuses them without measuring
    3. new model files (a new fingerprint) are measured again."""
    state_dir = tmp_path / "state"
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon:
        first = described(daemon)
        assert daemon.log().count(MEASURING) == 1
    assert first["threads"] >= 1 and first["batch_tokens"] >= 1 and first["run_cost_tokens"] >= 0
    assert recorded_tuning(state_dir)["threads"] == first["threads"]
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon:
        again = described(daemon)
        assert MEASURING not in daemon.log()
    assert {k: again[k] for k in ("threads", "batch_tokens", "run_cost_tokens")} == {
        k: first[k] for k in ("threads", "batch_tokens", "run_cost_tokens")
    }
    tinymodels.build_encoder(tmp_path / "encoder", seed=1)  # other weights: another fingerprint
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon:
        assert described(daemon)["fingerprint"] != first["fingerprint"]
        assert daemon.log().count(MEASURING) == 1


def test_a_configured_thread_count_is_kept_and_a_changed_one_tunes_again(tmp_path: Path, catalog: Path) -> None:
    """1. intra_op_threads = 1: the model runs on 1 thread, recorded as the setting  2. back to automatic:
    measured again."""
    state_dir = tmp_path / "state"
    with run_daemon(catalog, state_dir=str(state_dir), intra_op_threads=1) as daemon:
        assert described(daemon)["threads"] == 1
    assert recorded_tuning(state_dir)["threads_setting"] == 1
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon:
        described(daemon)
        assert daemon.log().count(MEASURING) == 1
    assert recorded_tuning(state_dir)["threads_setting"] == 0


def test_tune_on_request_measures_again_and_keeps_serving(catalog: Path) -> None:
    """1. loaded and measured  2. tune: measured again, reloaded, the reply describes it  3. it serves."""
    with run_daemon(catalog) as daemon, daemon.client(timeout=60) as client:
        described(daemon)
        reply = client.tune("enc")
        log = daemon.log()
        assert "model enc: tuning again on request" in log and log.count(MEASURING) == 2
        assert reply["state"] == "ready" and reply["threads"] >= 1
        assert client.embed("still serving", model="enc").shape == (1, tinymodels.BGE_FIELDS["dimension"])
