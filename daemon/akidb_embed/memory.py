"""Memory monitor: total, available (headroom) and used memory, own RSS and pressure, with their source.

Views: tegrastats on Jetson (a private child read by one thread), /proc/meminfo, the cgroup v2 limit.
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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIB = 1 << 20
TEGRASTATS = shutil.which("tegrastats")  # None off Jetson
_TO_MB = {"B": 1 / MIB, "kB": 1 / 1024, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
_NUM = r"(\d{1,12}(?:\.\d{1,6})?)"  # bounded: garbage never makes an inf to round
_PAIR = re.compile(_NUM + "/" + _NUM + "(B|kB|KB|MB|GB)")  # RAM 18207/62841MB
_SIZE = re.compile(r"(?:(\d{1,12})x)?" + _NUM + "(B|kB|KB|MB|GB)")  # lfb 466x4MB, lfb 252kB, cached 0MB
_SLACK = 0.5  # s on top of two intervals: child start-up and scheduling jitter
_STOP_WAIT = 1.0  # s between SIGTERM and SIGKILL
_MAX_DELAY = 60.0  # s, the longest wait before restarting a failing tegrastats
_MAX_LINE = 1 << 16  # bytes; a longer run without a newline is garbage
_PAGE = os.sysconf("SC_PAGE_SIZE")


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


@dataclass(frozen=True)
class Meminfo:
    """The /proc/meminfo figures the monitor needs, in bytes."""

    total: int
    available: int  # never MemFree: it counts reclaimable page cache as used
    swap_total: int
    swap_free: int


def read_meminfo(path: Path = Path("/proc/meminfo")) -> Meminfo:
    """MemTotal, MemAvailable, SwapTotal and SwapFree from ``path``, in bytes."""
    values: dict[str, int] = {}
    for line in path.read_text(encoding="ascii", errors="replace").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    try:
        return Meminfo(values["MemTotal"], values["MemAvailable"], values.get("SwapTotal", 0), values.get("SwapFree", 0))
    except KeyError as exc:  # MemAvailable exists since Linux 3.14: on every supported kernel
        raise ValueError(f"{path} has no {exc.args[0]}") from None


@dataclass(frozen=True)
class CgroupMemory:
    """The binding cgroup v2 memory limit on this process, in bytes."""

    path: str  # the cgroup whose limit binds: this process's or a parent's (a slice)
    limit: int  # memory.max
    current: int  # memory.current
    inactive_file: int  # page cache the kernel reclaims before it OOM-kills

    @property
    def headroom(self) -> int:
        """What the cgroup can still take: limit - current + reclaimable page cache."""
        return max(0, min(self.limit, self.limit - self.current + self.inactive_file))


def read_cgroup_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> CgroupMemory | None:
    """The tightest memory.max from this process's cgroup up to ``root``; None if unlimited or unknown."""
    try:
        own = next((s[3:].strip() for s in proc_cgroup.read_text().splitlines() if s.startswith("0::")), None)
    except OSError:
        own = None
    if own is None:  # unknown, or cgroup v1 only
        return None
    parts = [p for p in own.split("/") if p]
    parts = [] if ".." in parts else parts  # a cgroup outside our namespace: only its root is readable
    found = []
    for n in range(len(parts), -1, -1):  # systemd's MemoryMax= may sit on the slice, not the service
        folder = root.joinpath(*parts[:n])
        try:
            limit = (folder / "memory.max").read_text().strip()
            if limit != "max":
                stat = (folder / "memory.stat").read_text().split()  # comes with memory.max (the controller)
                inactive = int(stat[stat.index("inactive_file") + 1])
                current = int((folder / "memory.current").read_text())
                found.append(CgroupMemory("/" + "/".join(parts[:n]), int(limit), current, inactive))
        except (OSError, ValueError, IndexError):  # missing or odd files: no limit we can use
            continue
    return min(found, key=lambda c: c.headroom, default=None)


def process_rss() -> int:
    """This process's resident set size in bytes (one small read of /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


@dataclass(frozen=True)
class MemorySample:
    """One reading, in bytes; ``available`` is the headroom, the smallest of the views."""

    total: int  # the smallest ceiling: MemTotal, tegrastats' RAM total, the cgroup limit
    available: int
    used: int  # total - available
    own_rss: int
    swap_used: int
    swap_total: int
    lfb_mb: float | None  # tegrastats only: largest free blocks, falls under fragmentation
    source: str  # e.g. "tegrastats+meminfo", "cgroup+meminfo", "meminfo (tegrastats went silent)"

    @property
    def pressure(self) -> float:
        """Used over total, 0 to 1."""
        return self.used / self.total if self.total > 0 else 1.0

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the daemon's status reply."""
        return {**asdict(self), "pressure": round(self.pressure, 4)}


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


class MemoryMonitor:
    """Memory figures for the daemon: tegrastats when it delivers, /proc/meminfo, the cgroup limit."""

    def __init__(
        self,
        tegrastats: str | None = TEGRASTATS,
        interval_ms: int = 1000,
        meminfo: Path = Path("/proc/meminfo"),
        proc_cgroup: Path = Path("/proc/self/cgroup"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
    ) -> None:
        self.meminfo, self.proc_cgroup, self.cgroup_root = meminfo, proc_cgroup, cgroup_root
        # Off Jetson there is no thread at all: /proc is read on demand only.
        self.probe = TegrastatsProbe(tegrastats, interval_ms) if tegrastats else None
        self._reported: str | None = None  # the tegrastats problem last logged

    def start(self) -> None:
        if self.probe is not None:
            self.probe.start()

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.stop()

    @property
    def source(self) -> str:
        """The views a sample taken now combines, and why tegrastats is missing if it is."""
        return self.sample().source

    def sample(self) -> MemorySample:
        """Read the views that exist now; the headroom is the smallest of them."""
        info = read_meminfo(self.meminfo)
        views = [("meminfo", info.total, info.available)]  # name, ceiling, headroom
        if (tegra := self.probe.fresh() if self.probe else None) is not None:
            views.insert(0, ("tegrastats", tegra.ram_total_mb * MIB, max(0, tegra.ram_total_mb - tegra.ram_used_mb) * MIB))
        if (cgroup := read_cgroup_limit(self.proc_cgroup, self.cgroup_root)) is not None:
            views.insert(-1, ("cgroup", cgroup.limit, cgroup.headroom))
        total = min(v[1] for v in views)
        available = max(0, min(total, *(v[2] for v in views)))
        source = "+".join(v[0] for v in views) + self._why_not_tegrastats(tegra)
        swap_used, lfb = info.swap_total - info.swap_free, tegra.lfb_mb if tegra else None
        return MemorySample(total, available, total - available, process_rss(), swap_used, info.swap_total, lfb, source)

    def _why_not_tegrastats(self, tegra: TegraSample | None) -> str:
        """'' when tegrastats is in use or absent; else why not, logged once per problem (start-up is quiet)."""
        if self.probe is None or tegra is not None:
            self._reported = None
            return ""
        if (problem := self.probe.problem) is not None and problem != self._reported:
            self._reported = problem
            log.warning("tegrastats %s: memory figures come from /proc/meminfo alone", problem)
        return f" (tegrastats {self.probe.state})"
