"""Memory monitor: the tegrastats parser on real lines, the /proc and cgroup readers on real files,
and MemoryMonitor with the tegrastats stand-in (tests/bin/tegrastats) as a real child process."""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import pytest
from akidb_embed.memory import (
    MIB,
    CgroupMemory,
    MemoryMonitor,
    MemorySample,
    process_rss,
    read_cgroup_limit,
    read_meminfo,
)
from akidb_embed.tegrastats import parse_tegrastats

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "tegrastats"
STANDIN = HERE / "bin" / "tegrastats"
GIB_BY_FILE = {  # the boards' RAM sizes; the RAM total is a little under (carve-outs, kernel)
    "thor.txt": {128},
    "orin-agx.txt": {64},
    "orin-nx.txt": {16},
    "orin-nano.txt": {8},
    "xavier-agx.txt": {32, 16},
    "xavier-nx.txt": {8},
    "nano.txt": {4},
    "tx2.txt": {4, 8},
}
STAMP = re.compile(r"\d\d-\d\d-\d{4} \d\d:\d\d:\d\d ")
T = TypeVar("T")


def fixture_lines() -> list[tuple[str, int, str]]:
    return [
        (path.name, number, line)
        for path in sorted(FIXTURES.glob("*.txt"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
    ]


def samples(name: str) -> list:
    return [parse_tegrastats(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def wait_for(probe: Callable[[], T | None], timeout: float) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.01)
    raise AssertionError(f"nothing within {timeout} s")


# --- the parser on every real line -------------------------------------------------------------


def test_every_board_has_a_fixture() -> None:
    assert {path.name for path in FIXTURES.glob("*.txt")} == set(GIB_BY_FILE)


@pytest.mark.parametrize(("name", "number", "line"), fixture_lines(), ids=lambda v: str(v)[:20])
def test_every_fixture_line(name: str, number: int, line: str) -> None:
    sample = parse_tegrastats(line)
    assert sample is not None
    assert 0 < sample.ram_used_mb <= sample.ram_total_mb
    assert any(0.8 * gib * 1024 < sample.ram_total_mb <= gib * 1024 for gib in GIB_BY_FILE[name])
    if "SWAP" in line.split():
        assert sample.swap_total_mb and 0 <= sample.swap_used_mb <= sample.swap_total_mb
        assert sample.swap_cached_mb is not None
    else:
        assert sample.swap_used_mb is sample.swap_total_mb is sample.swap_cached_mb is None
    assert sample.lfb_count and sample.lfb_count > 0
    assert sample.lfb_block_mb == 4.0  # the RAM lfb, never IRAM's 252kB
    assert sample.lfb_mb == sample.lfb_count * 4.0
    assert (sample.timestamp is not None) == bool(STAMP.match(line))


def test_totals_as_the_readme_says() -> None:
    assert all(abs(s.ram_total_mb - 125770) <= 5 for s in samples("thor.txt"))
    assert all(abs(s.ram_total_mb - 62840) <= 40 for s in samples("orin-agx.txt"))
    assert all(abs(s.ram_total_mb - 7610) <= 10 for s in samples("orin-nano.txt"))


def test_fields_of_known_lines() -> None:
    agx = samples("orin-agx.txt")[0]
    assert (agx.ram_used_mb, agx.ram_total_mb) == (18207, 62841)
    assert (agx.swap_used_mb, agx.swap_total_mb, agx.swap_cached_mb) == (86, 31420, 0)
    assert (agx.lfb_count, agx.lfb_mb, agx.timestamp) == (466, 1864.0, datetime(2026, 5, 9, 18, 42, 6))
    thor = samples("thor.txt")[3]  # no swap configured
    assert (thor.ram_used_mb, thor.ram_total_mb, thor.swap_total_mb, thor.lfb_count) == (105265, 125772, None, 34)
    nano = samples("nano.txt")[0]  # IRAM 0/252kB(lfb 252kB) follows: not the RAM lfb
    assert (nano.ram_used_mb, nano.ram_total_mb, nano.lfb_count, nano.lfb_mb, nano.timestamp) == (717, 3964, 140, 560.0, None)
    xnx = samples("xavier-nx.txt")[0]
    assert (xnx.swap_used_mb, xnx.swap_total_mb, xnx.swap_cached_mb) == (139, 3886, 2)
    tx2 = samples("tx2.txt")[37]
    assert (tx2.ram_used_mb, tx2.lfb_count) == (1685, 1044)
    assert (tx2.swap_used_mb, tx2.swap_total_mb, tx2.swap_cached_mb) == (278, 8192, 23)


def test_tx2_run_shows_ram_rising_and_lfb_falling() -> None:
    run = samples("tx2.txt")[1:31]  # lines 2-31: one process growing
    ram = [s.ram_used_mb for s in run]
    lfb = [s.lfb_count for s in run]
    assert len(run) == 30 and {s.ram_total_mb for s in run} == {7859}
    assert ram[-1] - ram[0] > 2000 and sum(b > a for a, b in zip(ram, ram[1:])) > 20
    assert lfb[0] == 26 and lfb[-1] == 5 and sum(b > a for a, b in zip(lfb, lfb[1:])) <= 1


def test_spacing_gluing_and_line_ends_do_not_matter() -> None:
    base = parse_tegrastats("RAM 717/3964MB (lfb 140x4MB) SWAP 5/1982MB (cached 1MB) IRAM 0/252kB(lfb 252kB) CPU [1%@102]")
    for line in (
        "  RAM  717/3964MB\t(lfb   140x4MB)   SWAP 5/1982MB  (cached  1MB) IRAM 0/252kB(lfb 252kB)\r\n",
        "RAM 717/3964MB(lfb 140x4MB) SWAP 5/1982MB(cached 1MB) IRAM 0/252kB (lfb 252kB)",
        "IRAM 0/252kB(lfb 252kB) RAM 717/3964MB ( lfb 140x4MB ) SWAP 5/1982MB (cached 1MB)",
    ):
        assert parse_tegrastats(line) == base
    stamped = parse_tegrastats("05-17-2026  10:00:32   RAM 4208/125773MB (lfb 31x4MB)")
    assert stamped and stamped.timestamp == datetime(2026, 5, 17, 10, 0, 32)


def test_lfb_in_kb_and_fields_missing() -> None:
    kb = parse_tegrastats("RAM 100/200MB (lfb 3x512kB) CPU [1%@102]")
    assert kb and kb.lfb_count == 3 and kb.lfb_mb == 1.5
    single = parse_tegrastats("RAM 100/200MB (lfb 252kB)")
    assert single and single.lfb_count == 1 and single.lfb_block_mb == 252 / 1024
    bare = parse_tegrastats("RAM 100/200MB CPU [1%@102]")
    assert bare and bare.lfb_mb is None and bare.swap_total_mb is None and bare.timestamp is None


@pytest.mark.parametrize(
    "line",
    [
        "", "hello world", "IRAM 0/252kB(lfb 252kB)", "RAM lots/of MB", "RAM", "RAM 0/0MB", "RAM -1/100MB",
        "13-45-2026 99:99:99 CPU [1%]", "RAM " + "9" * 400 + "/" + "9" * 400 + "MB", "\x00\xff RAM\t(lfb 1x4MB)",
    ],  # fmt: skip
)
def test_lines_without_a_ram_field(line: str) -> None:
    assert parse_tegrastats(line) is None


# --- /proc/meminfo, cgroup v2, RSS --------------------------------------------------------------

MEMINFO = """\
MemTotal:       {total} kB
MemFree:          524288 kB
MemAvailable:   {available} kB
Buffers:           21500 kB
Cached:          2326064 kB
SwapTotal:       2097152 kB
SwapFree:        1572864 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


def write_meminfo(path: Path, total_mb: int, available_mb: int) -> Path:
    path.write_text(MEMINFO.format(total=total_mb * 1024, available=available_mb * 1024), encoding="ascii")
    return path


def write_cgroup(root: Path, cgroup: str, limit: str | None, current: int, inactive_file: int) -> None:
    folder = root / cgroup.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        (folder / "memory.max").write_text(f"{limit}\n")
    (folder / "memory.current").write_text(f"{current}\n")
    stat = f"anon 1000\nfile 2000\ninactive_anon 0\ninactive_file {inactive_file}\nactive_file 5\n"
    (folder / "memory.stat").write_text(stat)


def proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def test_meminfo_from_a_file(tmp_path: Path) -> None:
    info = read_meminfo(write_meminfo(tmp_path / "meminfo", 7620, 3000))
    assert (info.total, info.available) == (7620 * MIB, 3000 * MIB)  # MemAvailable, not MemFree
    assert (info.swap_total, info.swap_free) == (2048 * MIB, 1536 * MIB)


def test_meminfo_without_memavailable_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 1000 kB\nMemFree: 10 kB\n")
    with pytest.raises(ValueError, match="MemAvailable"):
        read_meminfo(path)


def test_meminfo_of_this_machine() -> None:
    info = read_meminfo()
    assert 0 < info.available <= info.total and 0 <= info.swap_free <= info.swap_total


def test_cgroup_own_limit(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    write_cgroup(root, "/", None, 10 << 30, 0)  # the real root has no memory.max
    write_cgroup(root, "/system.slice", "max", 5 << 30, 0)
    write_cgroup(root, "/system.slice/akidb-embed.service", str(2 << 30), 1 << 30, 256 * MIB)
    found = read_cgroup_limit(proc_cgroup(tmp_path, "0::/system.slice/akidb-embed.service\n"), root)
    assert found == CgroupMemory("/system.slice/akidb-embed.service", 2 << 30, 1 << 30, 256 * MIB)
    assert found.headroom == (1 << 30) + 256 * MIB


def test_cgroup_parent_limit_binds(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    write_cgroup(root, "/embed.slice", str(1 << 30), 900 * MIB, 0)  # MemoryMax= on the slice
    write_cgroup(root, "/embed.slice/akidb-embed.service", str(4 << 30), 800 * MIB, 50 * MIB)
    found = read_cgroup_limit(proc_cgroup(tmp_path, "0::/embed.slice/akidb-embed.service\n"), root)
    assert found and found.path == "/embed.slice" and found.headroom == 124 * MIB


def test_cgroup_namespace_root_limit(tmp_path: Path) -> None:
    root = tmp_path / "sys"  # in a container the root we see is the container's cgroup
    write_cgroup(root, "/", str(512 * MIB), 100 * MIB, 0)
    found = read_cgroup_limit(proc_cgroup(tmp_path, "0::/\n"), root)
    assert found and found.path == "/" and found.headroom == 412 * MIB


def test_cgroup_unlimited_or_unknown_is_none(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    write_cgroup(root, "/a.slice/b.service", "max", 1 << 30, 0)
    write_cgroup(root, "/a.slice", "max", 1 << 30, 0)
    assert read_cgroup_limit(proc_cgroup(tmp_path, "0::/a.slice/b.service\n"), root) is None
    (root / "c.service").mkdir()  # no memory.* files at all
    assert read_cgroup_limit(proc_cgroup(tmp_path, "0::/c.service\n"), root) is None
    assert read_cgroup_limit(tmp_path / "missing", root) is None


def test_cgroup_v1_only_is_none(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    write_cgroup(root, "/", str(1 << 30), 1 << 20, 0)  # not read: there is no "0::" line
    assert read_cgroup_limit(proc_cgroup(tmp_path, "4:memory:/x\n1:cpu:/\n"), root) is None


def test_cgroup_of_this_process() -> None:
    found = read_cgroup_limit()
    assert found is None or 0 <= found.headroom <= found.limit


def test_process_rss_follows_allocation() -> None:
    before = process_rss()
    block = mmap.mmap(-1, 64 * MIB)  # fresh pages: a heap allocation could reuse resident ones
    chunk = b"x" * MIB  # written a MiB at a time, so resident; a 64 MiB bytes object could stay on the heap
    for _ in range(64):
        block.write(chunk)
    assert process_rss() - before >= 48 * MIB
    block.close()
    assert process_rss() - before < 16 * MIB


def test_sample_pressure_and_dict() -> None:
    sample = MemorySample(8 * MIB, 2 * MIB, 6 * MIB, MIB, 0, 0, None, "meminfo")
    assert sample.pressure == 0.75
    assert sample.as_dict() == {
        "total": 8 * MIB, "available": 2 * MIB, "used": 6 * MIB, "own_rss": MIB, "swap_used": 0,
        "swap_total": 0, "lfb_mb": None, "source": "meminfo", "pressure": 0.75,
    }  # fmt: skip


# --- MemoryMonitor with the stand-in as a real child ----------------------------------------------

INTERVAL_MS = 100
TOTAL_MB, AVAILABLE_MB = 62841, 40000  # the fake /proc/meminfo of an AGX Orin 64GB


@pytest.fixture
def steer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Env for the stand-in: PID file and RAM file in ``tmp_path``; returns ``tmp_path``."""
    monkeypatch.setenv("TEGRASTATS_PID_FILE", str(tmp_path / "pids"))
    monkeypatch.setenv("TEGRASTATS_RAM_FILE", str(tmp_path / "ram"))
    monkeypatch.delenv("TEGRASTATS_EXIT_AFTER", raising=False)
    monkeypatch.delenv("TEGRASTATS_FIXTURE", raising=False)
    return tmp_path


@pytest.fixture
def make_monitor(tmp_path: Path) -> Iterator[Callable[..., MemoryMonitor]]:
    """MemoryMonitors on a fake /proc (no cgroup limit unless one is written); all stopped at the end."""
    made: list[MemoryMonitor] = []
    meminfo = write_meminfo(tmp_path / "meminfo", TOTAL_MB, AVAILABLE_MB)
    cgroup = proc_cgroup(tmp_path, "0::/akidb-embed.service\n")

    def make(tegrastats: str | None = str(STANDIN)) -> MemoryMonitor:
        monitor = MemoryMonitor(tegrastats, INTERVAL_MS, meminfo, cgroup, tmp_path / "sys")
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.stop()


def set_ram(folder: Path, used_mb: int, total_mb: int) -> None:
    (folder / "ram.tmp").write_text(f"{used_mb}/{total_mb}")
    os.replace(folder / "ram.tmp", folder / "ram")  # the stand-in never reads half a file


def pids(folder: Path) -> list[int]:
    path = folder / "pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tegrastats_figures_follow_the_board(steer: Path, make_monitor: Callable[..., MemoryMonitor]) -> None:
    monitor = make_monitor()
    monitor.start()
    first = wait_for(lambda: (s := monitor.sample()).source == "tegrastats+meminfo" and s, 3)
    assert first.lfb_mb is not None and first.total <= TOTAL_MB * MIB

    set_ram(steer, 30000, TOTAL_MB)  # another app grows: tegrastats headroom < MemAvailable
    began = time.monotonic()
    grown = wait_for(lambda: (s := monitor.sample()).available == (TOTAL_MB - 30000) * MIB and s, 2)
    assert time.monotonic() - began <= 2 * INTERVAL_MS / 1000 + 0.3
    assert (grown.total, grown.used, grown.source) == (TOTAL_MB * MIB, 30000 * MIB, "tegrastats+meminfo")
    assert grown.pressure == pytest.approx(30000 / TOTAL_MB)

    set_ram(steer, 10000, TOTAL_MB)  # now MemAvailable is the smaller view
    wait_for(lambda: (t := monitor.probe.fresh()) and t.ram_used_mb == 10000, 2)  # type: ignore[union-attr]
    shrunk = monitor.sample()
    assert (shrunk.available, shrunk.used) == (AVAILABLE_MB * MIB, (TOTAL_MB - AVAILABLE_MB) * MIB)
    assert shrunk.source == "tegrastats+meminfo"
    assert monitor.source == "tegrastats+meminfo"


def test_tegrastats_with_a_cgroup_limit(steer: Path, tmp_path: Path, make_monitor: Callable[..., MemoryMonitor]) -> None:
    write_cgroup(tmp_path / "sys", "/akidb-embed.service", str(4 << 30), 3 << 30, 0)
    monitor = make_monitor()
    monitor.start()
    sample = wait_for(lambda: (s := monitor.sample()).source.startswith("tegrastats") and s, 3)
    assert sample.source == "tegrastats+cgroup+meminfo"
    assert (sample.total, sample.available) == (4 << 30, 1 << 30)


def test_tegrastats_restarted_after_it_exits(
    steer: Path, make_monitor: Callable[..., MemoryMonitor], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TEGRASTATS_EXIT_AFTER", "3")
    monitor = make_monitor()
    with caplog.at_level(logging.WARNING, logger="akidb_embed.memory"):
        monitor.start()
        wait_for(lambda: len(pids(steer)) >= 2, 3)
    assert "tegrastats exited with status 0; restarting it" in caplog.text
    set_ram(steer, 54321, TOTAL_MB)  # the new child's lines arrive
    sample = wait_for(lambda: (s := monitor.sample()).used == 54321 * MIB and s, 2)
    assert sample.source == "tegrastats+meminfo"
    assert not alive(pids(steer)[0])  # the exited child was reaped
    monitor.stop()
    assert not any(alive(pid) for pid in pids(steer))


def test_stop_leaves_no_child(steer: Path, make_monitor: Callable[..., MemoryMonitor]) -> None:
    monitor = make_monitor()
    monitor.start()
    wait_for(lambda: monitor.sample().source.startswith("tegrastats"), 3)
    assert monitor.probe and monitor.probe.pid in pids(steer) and alive(pids(steer)[0])
    began = time.monotonic()
    monitor.stop()
    assert time.monotonic() - began < 1.5
    assert pids(steer) and not any(alive(pid) for pid in pids(steer))
    assert not any(t.name == "tegrastats" for t in threading.enumerate())
    assert monitor.sample().source.startswith("meminfo")


def test_reader_is_cheap(steer: Path, make_monitor: Callable[..., MemoryMonitor]) -> None:
    monitor = make_monitor()
    monitor.start()
    wait_for(lambda: monitor.sample().source.startswith("tegrastats"), 3)
    cpu = time.process_time()
    time.sleep(1.0)  # ten lines at 100 ms; the daemon's default is one a second
    assert time.process_time() - cpu < 0.02


def test_garbage_falls_back_to_meminfo(
    steer: Path, make_monitor: Callable[..., MemoryMonitor], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = steer / "garbage.txt"
    garbage.write_text("hello world\nRAM lots/of MB\nCPU [1%@102] GR3D_FREQ 0%\n")
    monkeypatch.setenv("TEGRASTATS_FIXTURE", str(garbage))
    monitor = make_monitor()
    with caplog.at_level(logging.WARNING, logger="akidb_embed.memory"):
        monitor.start()
        assert monitor.sample().source == "meminfo (tegrastats starting)"
        sample = wait_for(lambda: (s := monitor.sample()).source == "meminfo (tegrastats gave no usable output)" and s, 3)
    assert (sample.total, sample.available, sample.lfb_mb) == (TOTAL_MB * MIB, AVAILABLE_MB * MIB, None)
    assert "memory figures come from /proc/meminfo alone" in caplog.text
    assert "tegrastats gave no usable output; restarting it" in caplog.text


def test_missing_tegrastats_binary_falls_back(tmp_path: Path, make_monitor: Callable[..., MemoryMonitor]) -> None:
    monitor = make_monitor(str(tmp_path / "no-such-tegrastats"))
    monitor.start()
    expected = f"meminfo (tegrastats failed to start: {tmp_path / 'no-such-tegrastats'} not found)"
    sample = wait_for(lambda: (s := monitor.sample()).source == expected and s, 2)
    assert sample.available == AVAILABLE_MB * MIB


def test_without_tegrastats_no_thread(tmp_path: Path, make_monitor: Callable[..., MemoryMonitor]) -> None:
    threads = set(threading.enumerate())
    monitor = make_monitor(None)
    monitor.start()
    assert set(threading.enumerate()) == threads and monitor.probe is None
    sample = monitor.sample()
    assert sample.source == monitor.source == "meminfo"
    assert (sample.total, sample.available) == (TOTAL_MB * MIB, AVAILABLE_MB * MIB)
    assert sample.used == (TOTAL_MB - AVAILABLE_MB) * MIB
    assert (sample.swap_total, sample.swap_used, sample.lfb_mb) == (2048 * MIB, 512 * MIB, None) and sample.own_rss > 0
    write_cgroup(tmp_path / "sys", "/akidb-embed.service", str(8 << 30), 6 << 30, 1 << 30)
    limited = monitor.sample()
    assert (limited.source, limited.total, limited.available) == ("cgroup+meminfo", 8 << 30, 3 << 30)
    monitor.stop()
    assert set(threading.enumerate()) == threads


def test_real_machine_defaults() -> None:
    monitor = MemoryMonitor(tegrastats=None)
    monitor.start()
    sample = monitor.sample()
    assert sample.source in ("meminfo", "cgroup+meminfo")
    assert 0 <= sample.available <= sample.total and 0 <= sample.pressure <= 1
    monitor.stop()
