"""A real akidb-embed daemon process for tests: temporary socket, catalog and config."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from akidb_embed_client import Client
from akidb_embed_client.errors import Unavailable

REPO = Path(__file__).resolve().parents[1]
# Speed settings as a state file records them (footprint "tuning"), for tests that seed a measurement.
SEEDED_TUNING = {"threads": 0, "run_cost_tokens": 16, "batch_tokens": 16384, "threads_setting": 0}
# The daemon's model_roots unless a test sets its own: tests build their models under the temp directory
# (pytest's tmp_path, tinymodels), and scripts/dev.sh converts into .dev/, which the benchmarks serve from.
TEST_MODEL_ROOTS = [tempfile.gettempdir(), str(REPO / ".dev")]


def with_ctrl_c() -> None:
    """``preexec_fn`` of a child a test interrupts: Ctrl-C must reach it even when the suite itself runs with
    SIGINT ignored, as a background job of a shell without job control does and passes on to its children."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Daemon:
    """A running daemon; ``log()`` is what it wrote to stderr so far."""

    process: subprocess.Popen
    socket: Path
    catalog: Path
    log_path: Path

    def client(self, timeout: float = 30.0, retries: int = 1) -> Client:
        return Client(self.socket, timeout=timeout, retries=retries)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests_served(self) -> int:
        """Embed requests the default model has served since its load (its ``models`` entry's ``requests``)."""
        with self.client() as client:
            return next(m["requests"] for m in client.models() if m["default"])

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def alive(self) -> bool:
        return self.process.poll() is None


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def write_config(path: Path, settings: dict[str, Any]) -> None:
    """A daemon config file: top-level keys, then one [table] per dict value and one [[table]] per dict in a list."""
    lines = [f"{k} = {_toml(v)}" for k, v in settings.items() if not isinstance(v, dict) and not _is_tables(v)]
    for table, values in settings.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        for entry in values if _is_tables(values) else []:
            lines.append(f"\n[[{table}]]")
            lines += [f"{k} = {_toml(v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def run_daemon(
    catalog: Path,
    ready_timeout: float = 30.0,
    socket: Path | None = None,
    env: dict[str, str] | None = None,
    **settings: Any,
) -> Iterator[Daemon]:
    """Start ``akidb-embed serve`` on ``catalog``; stop it with SIGTERM and check it exits 0.

    ``settings`` are config keys ([limits] and [memory] as dicts); ``env`` adds to the environment.
    ``model_roots`` defaults to ``TEST_MODEL_ROOTS``.
    """
    # ipc:// paths must fit in sun_path (108 bytes); pytest's tmp_path can be longer.
    workdir = Path(tempfile.mkdtemp(prefix="akd-"))
    socket = socket or workdir / "embed.sock"
    config = workdir / "akidb-embed.toml"
    # tegrastats off unless a test asks for it: a test's PATH may hold the stand-in.
    settings["memory"] = {"tegrastats": "off", **settings.get("memory", {})}
    defaults = {"state_dir": str(workdir / "state"), "cache_dir": str(workdir / "cache"), "model_roots": TEST_MODEL_ROOTS}
    write_config(config, {**defaults, **settings})
    log_path = workdir / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("AKIDB_EMBED_SOCKET", None)
    command = [sys.executable, "-m", "akidb_embed", "serve", "--config", str(config), "--socket", str(socket), "--catalog", str(catalog)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    daemon = Daemon(process, socket, catalog, log_path)
    try:
        _wait_ready(daemon, ready_timeout)
        yield daemon
    finally:
        _stop(daemon)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited with {daemon.process.returncode}:\n{daemon.log()}")
        if daemon.socket.exists():
            with Client(daemon.socket, timeout=1.0, retries=1) as client:
                with contextlib.suppress(Unavailable):
                    client.ping()
                    return
        time.sleep(0.05)
    raise RuntimeError(f"daemon not ready after {timeout} s:\n{daemon.log()}")


def _stop(daemon: Daemon) -> None:
    if daemon.alive():
        daemon.signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
            raise RuntimeError(f"daemon ignored SIGTERM:\n{daemon.log()}") from None
    if daemon.process.returncode != 0:
        raise RuntimeError(f"daemon exited with {daemon.process.returncode}:\n{daemon.log()}")
