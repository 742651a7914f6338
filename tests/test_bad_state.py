"""Bad state on disk, through a real daemon: a damaged state file, a full state filesystem (a real
tmpfs filled to the last byte) and an unusable cache folder are each said in one log line naming
the path, the cause and the fix, and the daemon starts and serves anyway."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import Daemon, run_daemon, wait_for

# every round of upkeep retries a state write that failed: short, so the test sees one
FAST_UPKEEP = {"check_seconds": 0.2}


def serves(daemon: Daemon, model: str = "bge-tiny") -> None:
    with daemon.client() as client:
        assert client.embed("still serving", model=model).shape[0] == 1


def line_with(daemon: Daemon, *parts: str) -> str:
    """The one log line holding every part (the test fails if none or several do)."""
    lines = [line for line in daemon.log().splitlines() if all(part in line for part in parts)]
    assert len(lines) == 1, f"{len(lines)} lines with {parts}:\n{daemon.log()}"
    return lines[0]


def warm_state(catalog: Path, state_dir: Path) -> bytes:
    """A real state file: the one a daemon writes after loading e5-tiny."""
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon, daemon.client() as client:
        client.embed("x", model="e5-tiny")
    return (state_dir / "state.json").read_bytes()


DAMAGE = {
    "truncated": lambda real: real[: len(real) // 2],
    "garbage": lambda real: os.urandom(len(real)),
    "empty": lambda real: b"",
    "not an object": lambda real: b"[1, 2, 3]",
    "wrong types": lambda real: json.dumps({"models": {"e5-tiny": {"footprint": "lots"}}, "warm": ["e5-tiny"]}).encode(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_state_file_is_set_aside_and_the_daemon_starts_afresh(
    tmp_path: Path, catalog: Path, damage: str
) -> None:
    """1. a daemon leaves a real state file  2. it is damaged  3. the next daemon says so in one line,
    moves it aside, serves, and writes a good state file again."""
    state_dir = tmp_path / "state"
    bad = DAMAGE[damage](warm_state(catalog, state_dir))
    (state_dir / "state.json").write_bytes(bad)
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon:
        line = line_with(daemon, "state file", "is damaged")
        assert str(state_dir / "state.json") in line and "nothing to fix" in line
        serves(daemon, "e5-tiny")
        written = json.loads((state_dir / "state.json").read_text())
        assert written["warm"] == ["e5-tiny"] and written["models"]["e5-tiny"]["footprint"] > 0
    assert (state_dir / "state.json.damaged").read_bytes() == bad


def test_a_state_file_that_cannot_be_read_is_said_and_ignored(tmp_path: Path, catalog: Path) -> None:
    """A folder where the state file should be: one line with the cause and the fix; the daemon serves."""
    state_dir = tmp_path / "state"
    (state_dir / "state.json").mkdir(parents=True)
    with run_daemon(catalog, state_dir=str(state_dir)) as daemon:
        serves(daemon)
        line = line_with(daemon, "cannot read the state file", str(state_dir / "state.json"))
        assert "Is a directory" in line and "Fix:" in line
        line_with(daemon, "cannot write the state file")  # said once, though every load tries again


def ours(state_dir: Path) -> list[str]:
    """The state store's files in ``state_dir`` (the metrics textfile has a folder of its own there)."""
    return sorted(name for name in os.listdir(state_dir) if name != "metrics")


@contextlib.contextmanager
def full_filesystem(mountpoint: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs at ``mountpoint`` with a ``state`` folder, filled to the last byte; yields the filler."""
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        (mountpoint / "state").mkdir()
        filler = mountpoint / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
        yield filler
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


def test_a_full_state_disk_is_said_once_and_the_state_saved_once_there_is_room(tmp_path: Path, catalog: Path) -> None:
    """1. state_dir on a full tmpfs: one line at start, the daemon serves and loads models  2. space is freed:
    the next upkeep round writes the state, with no temporary file left  3. a restart finds the warm model."""
    with full_filesystem(tmp_path / "disk") as filler:
        state_dir = filler.parent / "state"
        with run_daemon(catalog, state_dir=str(state_dir), memory=FAST_UPKEEP) as daemon:
            line = line_with(daemon, "cannot write the state file", "No space left on device")
            assert str(state_dir / "state.json") in line and "Fix: free space" in line
            serves(daemon, "e5-tiny")  # its load saves the state again: it fails again, silently
            assert ours(state_dir) == [], "a failed write left a file behind"
            filler.unlink()
            wait_for(lambda: (state_dir / "state.json").exists())
            line_with(daemon, "state file", "saved at last")
            assert json.loads((state_dir / "state.json").read_text())["warm"] == ["e5-tiny"]
            assert ours(state_dir) == ["state.json"]
        with run_daemon(catalog, state_dir=str(state_dir)) as daemon, daemon.client() as client:
            wait_for(lambda: {m["id"]: m["state"] for m in client.models()}["e5-tiny"] == "ready", timeout=30)


def test_an_unusable_cache_folder_is_said_and_the_daemon_serves(tmp_path: Path, catalog: Path) -> None:
    """cache_dir and state_dir below a regular file (no folder can be made there): a line each, naming the
    path, the cause and the fix; embeddings are served and the daemon stops cleanly."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    cache_dir, state_dir = blocker / "cache", blocker / "state"
    with run_daemon(catalog, state_dir=str(state_dir), cache_dir=str(cache_dir)) as daemon:
        serves(daemon)
        cache_line = line_with(daemon, f"cache_dir {cache_dir} cannot be used")
        assert "Not a directory" in cache_line and "Fix:" in cache_line
        state_line = line_with(daemon, "cannot write the state file", str(state_dir / "state.json"))
        assert "Not a directory" in state_line
