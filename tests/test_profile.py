"""Measured profiles through a real daemon: the bench op, its storage across restarts, new versions,
the command line, and other models' traffic while one is measured."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tinymodels
from akidb_embed import modeltable
from akidb_embed_client import errors
from daemon_process import REPO, Daemon, run_daemon, wait_for

FAST = 10  # single-text requests timed: enough for a p95, quick on the tiny models


def entry(daemon: Daemon, model_id: str) -> dict:
    with daemon.client() as client:
        return next(m for m in client.models() if m["id"] == model_id)


def test_a_profile_is_measured_kept_and_shown(daemon: Daemon) -> None:
    assert entry(daemon, "bge-tiny")["profile"] is None  # never profiled: no guess
    with daemon.client() as client:
        profile = client.bench("bge-tiny", texts=FAST)
    model = entry(daemon, "bge-tiny")
    assert model["profile"] == profile
    assert 0 < profile["p50_ms"] <= profile["p95_ms"] and profile["texts_per_s"] > 0 and profile["batch_texts"] >= 1
    assert 0 < profile["cold_load_ms"] <= model["load_ms"]
    assert profile["memory_mb"] == model["memory_mb"]
    assert profile["fingerprint"] == model["fingerprint"] and profile["provider"] == model["provider"]
    assert profile["min_cosine"] is None  # the tiny catalog's models have no golden vectors
    assert model["stats"]["requests"] == 0 and model["requests"] == 0  # the bench's own jobs are no one's requests
    assert model["stats"]["hits"] + model["stats"]["misses"] == 0


def test_a_profile_survives_a_restart_and_a_new_version_has_none(catalog: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with run_daemon(catalog, state_dir=str(state)) as daemon:
        with daemon.client() as client:
            profile = client.bench("e5-tiny", texts=FAST)
    with run_daemon(catalog, state_dir=str(state)) as daemon:
        assert entry(daemon, "e5-tiny")["profile"] == profile  # not loaded: the profile of the version last loaded
        with daemon.client() as client:
            client.load("e5-tiny")
        assert entry(daemon, "e5-tiny")["profile"] == profile
        other = tmp_path / "other-weights"
        tinymodels.build_encoder(other, seed=7)  # same shapes, other weights: a new fingerprint
        tinymodels.write_manifest(catalog, "e5-tiny", other, **tinymodels.E5_FIELDS)
        wait_for(lambda: entry(daemon, "e5-tiny").get("fingerprint") not in (None, profile["fingerprint"]), timeout=30)
        assert entry(daemon, "e5-tiny")["profile"] is None


def test_other_models_are_served_while_one_is_measured(daemon: Daemon) -> None:
    with daemon.client() as client:
        client.load("bge-tiny")
        client.embed("warm", "e5-tiny")
    done = threading.Event()
    bench = threading.Thread(target=lambda: (daemon.client().bench("bge-tiny", texts=1000), done.set()))
    bench.start()
    wait_for(lambda: entry(daemon, "bge-tiny")["in_flight"] == 1)  # the bench holds bge-tiny
    with daemon.client() as client:
        for i in range(20):
            client.embed(f"text {i}", "e5-tiny")
    served_during = not done.is_set()
    bench.join()
    assert served_during, "e5-tiny's 20 requests waited for bge-tiny's bench"


def test_bad_bench_requests(daemon: Daemon) -> None:
    with daemon.client() as client:
        with pytest.raises(errors.UnknownModel):
            client.bench("no-such-model")
        for texts in (0, 1001, "10", True):
            with pytest.raises(errors.BadRequest, match="texts"):
                client.bench("bge-tiny", texts=texts)


def test_the_command_line_shows_progress_and_the_profiles(daemon: Daemon) -> None:
    command = [sys.executable, "-m", "akidb_embed", "bench", "bge-tiny", "e5-tiny", "--texts", str(FAST),
               "--socket", str(daemon.socket)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "bench: bge-tiny (1/2)" in done.stderr and "bench: e5-tiny (2/2)" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["id", "provider", "cold", "load"] and len(lines) == 4
    listed = subprocess.run([sys.executable, "-m", "akidb_embed", "models", "--socket", str(daemon.socket)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[2:] if line.strip()}
    assert "ms" in rows["bge-tiny"] and modeltable.NEVER in rows["qwen3-tiny"]


def test_the_table_shows_a_dash_for_what_was_never_measured() -> None:
    never = {"id": "m", "state": "available", "profile": None}
    wide = modeltable.models_table([never], wide=True).splitlines()
    headers = [h for h in wide[0].split("  ") if h.strip()]
    cells = dict(zip(headers, [c for c in wide[2].split("  ") if c.strip()]))
    assert all(cells[h] == modeltable.NEVER for h in ("p50", "p95", "texts/s", "cold load", "quality"))
    narrow = modeltable.models_table([never]).splitlines()[0]
    assert "p95" in narrow and "cold load" not in narrow and "weights/work/peak" not in narrow
