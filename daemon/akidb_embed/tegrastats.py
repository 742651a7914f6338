"""tegrastats on Jetson: a pure parser of its lines and a supervised private child that reads them.

Parse by token: fields come and go across boards and releases. The child is ours alone: it is
restarted when it exits or goes silent and stopped by its PID, never with ``tegrastats --stop``
(which would kill every tegrastats on the machine).
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime

log = logging.getLogger(__name__)

MIB = 1 << 20
_TO_MB = {"B": 1 / MIB, "kB": 1 / 1024, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
_NUM = r"(\d{1,12}(?:\.\d{1,6})?)"  # bounded: garbage never makes an inf to round
_PAIR = re.compile(_NUM + "/" + _NUM + "(B|kB|KB|MB|GB)")  # RAM 18207/62841MB
_SIZE = re.compile(r"(?:(\d{1,12})x)?" + _NUM + "(B|kB|KB|MB|GB)")  # lfb 466x4MB, lfb 252kB, cached 0MB
_SLACK = 0.5  # s on top of two intervals: child start-up and scheduling jitter
_STOP_WAIT = 1.0  # s between SIGTERM and SIGKILL
_MAX_DELAY = 60.0  # s, the longest wait before restarting a failing tegrastats
_MAX_LINE = 1 << 16  # bytes; a longer run without a newline is garbage


@dataclass(frozen=True)
class TegraSample:
    """The memory fields of one tegrastats line, in MB (MiB) as tegrastats prints them."""

    ram_used_mb: int
    ram_total_mb: int
    swap_used_mb: int | None = None  # the SWAP field is absent when no swap is configured
    swap_total_mb: int | None = None
    swap_cached_mb: int | None = None
    lfb_count: int | None = None  # free blocks of the largest size; few means fragmented
    lfb_block_mb: float | None = None
    lfb_mb: float | None = None  # count x block size
    timestamp: datetime | None = None  # JetPack 5 on; local time, no zone


def parse_tegrastats(line: str) -> TegraSample | None:
    """The memory fields of one tegrastats line, or None when it has no RAM field."""
    # Parentheses as tokens of their own: IRAM prints "0/252kB(lfb 252kB)" with no space.
    tokens = line.replace("(", " ( ").replace(")", " ) ").split()
    found: dict[str, tuple[int, int, tuple[int, float] | None]] = {}
    for i, key in enumerate(tokens[:-1]):
        pair = _PAIR.fullmatch(tokens[i + 1])
        if key in ("RAM", "SWAP") and key not in found and pair:  # "IRAM" is another key
            inner = tokens[i + 2 : i + 5]  # "( lfb 466x4MB" or "( cached 0MB"
            size = _size(inner[2]) if len(inner) == 3 and inner[:2] == ["(", "lfb" if key == "RAM" else "cached"] else None
            found[key] = (round(float(pair[1]) * _TO_MB[pair[3]]), round(float(pair[2]) * _TO_MB[pair[3]]), size)
    if "RAM" not in found or found["RAM"][1] <= 0:
        return None
    used, total, lfb = found["RAM"]
    swap_used, swap_total, cached = found.get("SWAP", (None, None, None))
    try:
        stamp: datetime | None = datetime.strptime(" ".join(tokens[:2]), "%m-%d-%Y %H:%M:%S")
    except ValueError:
        stamp = None
    count, block = lfb or (None, None)
    lfb_mb = count * block if count is not None and block is not None else None
    return TegraSample(used, total, swap_used, swap_total, round(cached[1]) if cached else None, count, block, lfb_mb, stamp)


def _size(text: str) -> tuple[int, float] | None:
    """Count and block size in MB of ``466x4MB``, or of ``252kB`` (one block)."""
    size = _SIZE.fullmatch(text)
    return (int(size[1] or 1), float(size[2]) * _TO_MB[size[3]]) if size else None


class TegrastatsProbe:
    """A private ``tegrastats --interval N`` child, restarted when it fails, and its latest sample."""

    def __init__(self, command: str, interval_ms: int) -> None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, not {interval_ms}")
        stdbuf = shutil.which("stdbuf")  # line-buffered, or a pipe gets 4 kB blocks
        self.argv = [*([stdbuf, "-oL"] if stdbuf else []), command, "--interval", str(interval_ms)]
        self.command, self.interval = command, interval_ms / 1000  # command: the executable, no shell
        self.timeout = 2 * self.interval + _SLACK  # silence that restarts the child; age of a stale sample
        self.problem: str | None = None  # why the last child was replaced; None once one delivers
        self.pid: int | None = None
        self._latest: tuple[TegraSample, float] | None = None  # sample, time.monotonic()
        self._stop, self._lock = threading.Event(), threading.Lock()  # the lock: spawning vs stop()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the reader thread, which starts the child."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tegrastats", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop our child by its PID (never ``tegrastats --stop``: it kills everyone's) and the thread."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is not None:
            _end(proc)
        if self._thread is not None:
            self._thread.join(self.timeout + 2 * _STOP_WAIT)
        self._thread, self._latest, self.problem = None, None, None

    @property
    def state(self) -> str:
        """Why there is no fresh sample: the last child's problem, or starting, stale, not running."""
        return self.problem or ("not running" if self._thread is None else "stale" if self._latest else "starting")

    def fresh(self) -> TegraSample | None:
        """The latest sample, or None when there is none younger than ``timeout``."""
        latest = self._latest
        return latest[0] if latest is not None and time.monotonic() - latest[1] <= self.timeout else None

    def _run(self) -> None:
        delay = first = max(self.interval, 0.1)
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                reason = self._run_child()
            except Exception as exc:  # the thread must outlive any one bad child
                log.exception("tegrastats reader failed")
                reason = f"failed: {exc}"
            if reason is None:
                return
            if time.monotonic() - began >= _MAX_DELAY:
                delay = first  # it ran well for a while (a silent one is cut short): not a crash loop
            self.problem = reason
            log.warning("tegrastats %s; restarting it in %.1f s", reason, delay)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, _MAX_DELAY)

    def _run_child(self) -> str | None:
        """Run one child and keep its samples until it fails (returns why) or we stop (None)."""
        with self._lock:
            if self._stop.is_set():
                return None
            if shutil.which(self.command) is None:
                return f"failed to start: {self.command} not found"
            try:  # stderr goes to ours (the journal); its own session keeps a Ctrl-C meant for us
                proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                return f"failed to start: {exc}"
            self._proc, self.pid = proc, proc.pid
        fd, pending, pipe = proc.stdout.fileno(), b"", select.poll()  # type: ignore[union-attr]
        pipe.register(fd, select.POLLIN)  # poll, not select(): the daemon's fds may pass FD_SETSIZE
        last_good = last_any = time.monotonic()
        try:
            while True:
                wait = last_good + self.timeout - time.monotonic()
                ready = wait > 0 and pipe.poll(wait * 1000)
                if self._stop.is_set():
                    return None
                if not ready:
                    return "gave no usable output" if last_any > last_good else "went silent"
                if not (chunk := os.read(fd, _MAX_LINE)):
                    return f"exited with status {proc.wait(_STOP_WAIT)}"
                last_any = time.monotonic()
                *lines, pending = (pending + chunk).split(b"\n")
                pending = pending if len(pending) < _MAX_LINE else b""
                for raw in lines:
                    if (sample := parse_tegrastats(raw.decode(errors="replace"))) is not None:
                        if self.problem is not None:
                            log.info("tegrastats delivers again")
                        self._latest, last_good, self.problem = (sample, last_any), last_any, None
        except subprocess.TimeoutExpired:
            return "closed its output"
        finally:
            _end(proc)
            proc.stdout.close()  # type: ignore[union-attr]
            with self._lock:
                self._proc = self.pid = None


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child by its PID, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is None:
        proc.terminate()  # Popen sends nothing once the child is reaped: never a recycled PID
        try:
            proc.wait(_STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
