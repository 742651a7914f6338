"""systemd notifications from a real daemon to a real NOTIFY_SOCKET, and journald-friendly logs.

The test binds the AF_UNIX datagram socket systemd would own; a thread collects what arrives
with its arrival time, so the daemon never waits on a full queue.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from akidb_embed.systemd import Notifier, status_line
from daemon_process import REPO, TEST_MODEL_ROOTS, Daemon, run_daemon, write_config

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
SLACK = 0.3  # a loaded test machine may be late by this much


@dataclass
class Message:
    at: float  # time.monotonic() on arrival
    fields: dict[str, str]


class NotifySocket:
    """What systemd's notify socket would receive, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[Message] = []
        self._changed = threading.Condition()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed:
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._changed:
                self.messages.append(Message(time.monotonic(), fields))
                self._changed.notify_all()

    def wait(self, predicate: Callable[[dict[str, str]], bool], after: int = 0, timeout: float = 30.0) -> int:
        """The index of the first message from ``after`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(after, len(self.messages)):
                    if predicate(self.messages[i].fields):
                        return i
                left = deadline - time.monotonic()
                assert left > 0, f"no such notification in {timeout} s; got {[m.fields for m in self.messages]}"
                self._changed.wait(left)

    def statuses(self, start: int = 0, end: int | None = None) -> list[str]:
        with self._changed:
            return [m.fields["STATUS"] for m in self.messages[start:end] if "STATUS" in m.fields]

    def pings(self) -> list[float]:
        with self._changed:
            return [m.at for m in self.messages if m.fields.get("WATCHDOG") == "1"]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._socket.close()


@dataclass
class NotifiedDaemon(Daemon):
    notify: NotifySocket = field(default=None)  # type: ignore[assignment]


def key(name: str, value: str = "1") -> Callable[[dict[str, str]], bool]:
    return lambda fields: fields.get(name) == value


@contextlib.contextmanager
def notified_daemon(catalog: Path, env: dict[str, str] | None = None, **settings) -> Iterator[NotifiedDaemon]:
    """A daemon told of a NOTIFY_SOCKET and WATCHDOG_USEC, as systemd would start it.

    Managed here rather than by ``run_daemon``: a test may hang it or end it with a signal.
    Whatever is still alive at the end is killed.
    """
    workdir = Path(tempfile.mkdtemp(prefix="akn-"))  # AF_UNIX paths must stay short
    notify = NotifySocket(workdir / "notify")
    config = workdir / "akidb-embed.toml"
    settings = {"state_dir": str(workdir / "state"), "cache_dir": str(workdir / "cache"), "model_roots": TEST_MODEL_ROOTS,
                **settings}
    settings["memory"] = {"tegrastats": "off", **settings.get("memory", {})}
    write_config(config, settings)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    for name in ("AKIDB_EMBED_SOCKET", "WATCHDOG_PID", "AKIDB_EMBED_TEST_HANG_SIGNAL"):
        full_env.pop(name, None)
    full_env.update(env or {})
    sock, log_path = workdir / "embed.sock", workdir / "daemon.log"
    command = [sys.executable, "-m", "akidb_embed", "serve", "--config", str(config), "--socket", str(sock), "--catalog", str(catalog)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    daemon = NotifiedDaemon(process, sock, catalog, log_path, notify)
    try:
        yield daemon
    finally:
        if daemon.alive():
            process.kill()
        process.wait()
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_ready_status_watchdog_reload_and_stop(catalog: Path) -> None:
    """1. READY=1 arrives and the socket answers a ping right then  2. STATUS names models and memory
    3. WATCHDOG=1 every 0.5 s  4. SIGHUP: RELOADING=1 + MONOTONIC_USEC, then READY=1
    5. SIGTERM: STOPPING=1 and exit 0."""
    with notified_daemon(catalog) as daemon:
        ready = daemon.notify.wait(key("READY"))
        with daemon.client(timeout=2.0) as client:
            assert client.ping()["pong"]
        status = daemon.notify.messages[ready].fields["STATUS"]
        assert status.startswith("serving: 0 models ready, 3 available; memory "), status
        assert "% used (meminfo" in status and status.endswith("; 0 in flight")

        with daemon.client() as client:
            client.embed("load one", model="e5-tiny")
        daemon.notify.wait(lambda f: f.get("STATUS", "").startswith("serving: 1 model ready, 2 available"), ready)

        first_ping = daemon.notify.wait(key("WATCHDOG"), ready, timeout=1 + SLACK)
        daemon.notify.wait(lambda f: len(daemon.notify.pings()) >= 4, first_ping, timeout=3)

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.signal(signal.SIGHUP)
        reloading = daemon.notify.wait(key("RELOADING"), ready + 1)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(daemon.notify.messages[reloading].fields["MONOTONIC_USEC"]) <= after
        daemon.notify.wait(key("READY"), reloading + 1, timeout=5)

        daemon.signal(signal.SIGTERM)
        stopping = daemon.notify.wait(key("STOPPING"), reloading)
        assert daemon.notify.messages[stopping].fields["STATUS"].startswith("stopping: ")
        assert daemon.process.wait(timeout=30) == 0, daemon.log()
        pings = daemon.notify.pings()
        assert len(pings) >= 4
        assert max(b - a for a, b in itertools.pairwise(pings)) < WATCHDOG_USEC / 2e6 + SLACK


def test_pinned_model_loads_after_ready(catalog: Path, tmp_path: Path) -> None:
    """1. pin e5-tiny, stop  2. restart: READY=1 while nothing is loaded yet
    3. STATUS then shows the model loading, then ready."""
    state_dir = tmp_path / "state"
    with run_daemon(catalog, state_dir=str(state_dir)) as first, first.client() as client:
        assert client.pin("e5-tiny")["pinned"]
    with notified_daemon(catalog, state_dir=str(state_dir)) as daemon:
        ready = daemon.notify.wait(key("READY"))
        assert daemon.notify.messages[ready].fields["STATUS"].startswith("serving: 0 models ready, "), daemon.notify.statuses()
        loading = daemon.notify.wait(lambda f: "1 loading" in f.get("STATUS", ""), ready, timeout=5)
        daemon.notify.wait(lambda f: f.get("STATUS", "").startswith("serving: 1 model ready, 2 available;"), loading + 1)
        with daemon.client() as client:
            (e5,) = [m for m in client.models() if m["id"] == "e5-tiny"]
        assert e5["state"] == "ready" and e5["pinned"]


def test_hung_loop_stops_the_watchdog_pings(catalog: Path) -> None:
    """1. pings flow  2. SIGUSR2 under the test-only variable hangs the loop  3. no more pings; still alive."""
    with notified_daemon(catalog, env={"AKIDB_EMBED_TEST_HANG_SIGNAL": "1"}) as daemon:
        ready = daemon.notify.wait(key("READY"))
        daemon.notify.wait(lambda f: len(daemon.notify.pings()) >= 2, ready, timeout=3)
        hung_at = time.monotonic()
        daemon.signal(signal.SIGUSR2)
        time.sleep(4 * WATCHDOG_USEC / 2e6)
        late = [at - hung_at for at in daemon.notify.pings() if at > hung_at + 0.2]
        assert not late, f"pings {late} s after the hang"
        assert daemon.alive()
        assert "hanging the event loop (test-only)" in daemon.log()
    # notified_daemon kills it: a hung loop answers no SIGTERM, as systemd's watchdog would find.


def test_sigusr2_keeps_its_default_without_the_test_variable(catalog: Path) -> None:
    with notified_daemon(catalog) as daemon:
        daemon.notify.wait(key("READY"))
        daemon.signal(signal.SIGUSR2)
        assert daemon.process.wait(timeout=10) == -signal.SIGUSR2


def test_notifier_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier()
    assert not notifier.active and notifier.watchdog_interval() is None
    notifier.ready("serving")
    notifier.reloading()
    notifier.status("x")
    notifier.ping()
    notifier.stopping()


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="akn-"))
    notify = NotifySocket(workdir / "notify")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert Notifier().watchdog_interval() == 2.0
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert Notifier().watchdog_interval() is None
        notifier = Notifier()
        for text in ("a", "a", "b"):
            notifier.status(text)
        notify.wait(key("STATUS", "b"), timeout=2)
        assert notify.statuses() == ["a", "b"]  # unchanged text is not sent again
    finally:
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_status_line() -> None:
    figures = {"models": {"available": 5, "ready": 2, "loading": 1}, "memory": {"pressure": 0.612, "source": "tegrastats+meminfo"}, "in_flight": 0}
    assert status_line(figures) == "serving: 2 models ready, 1 loading, 5 available; memory 61% used (tegrastats+meminfo); 0 in flight"
    figures["models"] = {}
    assert status_line(figures, "stopping").startswith("stopping: no models in the catalog; memory 61%")


@pytest.mark.parametrize("journal", ["stderr", "elsewhere", "none"])
def test_log_lines_carry_a_timestamp_unless_stderr_is_the_journal(tmp_path: Path, journal: str) -> None:
    """systemd names the journal stream in JOURNAL_STREAM (device:inode); only that stream drops timestamps."""
    stderr_path = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    code = "import logging; from akidb_embed.log import setup_logging; setup_logging('info'); logging.getLogger('x').info('hello')"
    with open(stderr_path, "w") as stderr:
        st = os.fstat(stderr.fileno())
        if journal == "stderr":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal == "elsewhere":  # e.g. run by hand from a shell inside a systemd service
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        subprocess.run([sys.executable, "-c", code], env=env, stderr=stderr, check=True)
    line = stderr_path.read_text().strip()
    if journal == "stderr":
        assert line == "INFO x: hello"
    else:
        assert line.endswith(" INFO x: hello") and line[:4].isdigit(), line
