"""Prometheus metrics from a real daemon: the textfile from start-up, counts that are what was sent,
the loopback-only HTTP endpoint, and the settings that refuse anything else."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from akidb_embed.metrics import write_readable
from akidb_embed.settings import MetricsSettings, SettingsError, load_settings
from akidb_embed_client import errors
from daemon_process import Daemon, run_daemon, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families

MODELS = {"bge-tiny", "e5-tiny", "qwen3-tiny"}
FAST = {"interval_seconds": 0.2}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def textfile(daemon: Daemon) -> Path:
    return daemon.socket.parent / "state" / "metrics" / "akidb-embed.prom"


def scraped(daemon: Daemon) -> dict[tuple[str, frozenset], float]:
    wait_for(lambda: textfile(daemon).is_file())
    return samples(textfile(daemon).read_text())


def value(figures: dict, name: str, **labels: str) -> float:
    return figures[(name, frozenset(labels.items()))]


def test_every_model_has_its_series_from_the_start(catalog: Path) -> None:
    with run_daemon(catalog, metrics=FAST) as daemon:
        figures = scraped(daemon)
        for model in MODELS:
            assert value(figures, "akidb_embed_requests_total", model=model, code="ok") == 0
            assert value(figures, "akidb_embed_model_state", model=model, state="available") == 1
            assert value(figures, "akidb_embed_request_duration_seconds_count", model=model, stage="total") == 0
            assert value(figures, "akidb_embed_model_circuit_open", model=model) == 0
        families = {f.name: f for f in text_string_to_metric_families(textfile(daemon).read_text())}
        assert families["akidb_embed_requests"].type == "counter" and families["akidb_embed_memory_total_bytes"].samples
        assert all("model" in s.labels for s in families["akidb_embed_model_memory_bytes"].samples)


def test_the_counts_are_what_was_sent(catalog: Path) -> None:
    sizes = [2, 1, 4]
    with run_daemon(catalog, metrics=FAST) as daemon, daemon.client() as client:
        for size in sizes:
            client.embed(["a text"] * size, "e5-tiny")
        with pytest.raises(errors.BadRequest):
            client.embed("a text", "e5-tiny", dimensions=5)

        def written() -> dict:
            figures = samples(textfile(daemon).read_text())
            return figures if ("akidb_embed_requests_total", frozenset({("model", "e5-tiny"), ("code", "bad_request")})) in figures else {}

        wait_for(written)
        figures = written()
        assert value(figures, "akidb_embed_requests_total", model="e5-tiny", code="ok") == len(sizes)
        assert value(figures, "akidb_embed_requests_total", model="e5-tiny", code="bad_request") == 1
        assert value(figures, "akidb_embed_texts_total", model="e5-tiny") == sum(sizes)
        for stage in ("queue", "inference", "total"):
            count = value(figures, "akidb_embed_request_duration_seconds_count", model="e5-tiny", stage=stage)
            inf = value(figures, "akidb_embed_request_duration_seconds_bucket", model="e5-tiny", stage=stage, le="+Inf")
            assert count == inf == len(sizes)
        assert value(figures, "akidb_embed_model_loaded", model="e5-tiny") == 1
        assert value(figures, "akidb_embed_model_memory_bytes", model="e5-tiny") > 0
        assert value(figures, "akidb_embed_model_loads_total", model="e5-tiny") == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the process's open sockets, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while listed: the daemon opens and closes files as it runs
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the process's listening TCP sockets, IPv4 and IPv6, from /proc."""
    inodes = socket_inodes(pid)
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_the_http_endpoint_listens_on_loopback_only(catalog: Path) -> None:
    port = free_port()
    with run_daemon(catalog, metrics={"http": f"127.0.0.1:{port}", **FAST}) as daemon:
        assert listening(daemon.process.pid) == {("127.0.0.1", port)}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            figures = samples(answer.read().decode())
        assert {labels for name, labels in figures if name == "akidb_embed_model_loaded"} == {
            frozenset({("model", m)}) for m in MODELS}


def test_a_daemon_without_http_opens_no_tcp_port(daemon: Daemon) -> None:
    assert listening(daemon.process.pid) == set()


def test_a_non_loopback_address_is_refused_at_start(tmp_path: Path, catalog: Path) -> None:
    config = tmp_path / "akidb-embed.toml"
    write_config(config, {"metrics": {"http": "0.0.0.0:9464"}, "state_dir": str(tmp_path / "state")})
    command = [sys.executable, "-m", "akidb_embed", "serve", "--config", str(config), "--catalog", str(catalog),
               "--socket", str(tmp_path / "s.sock")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "metrics.http '0.0.0.0:9464' must be a loopback" in done.stderr


def test_an_unwritable_textfile_is_logged_once_and_serving_goes_on(catalog: Path) -> None:
    with run_daemon(catalog, metrics={"textfile": "/proc/akidb-embed/metrics.prom", **FAST}) as daemon:
        with daemon.client() as client:
            client.embed("still served", "bge-tiny")
        wait_for(lambda: "cannot write the metrics textfile" in daemon.log())
        client.ping()
        assert daemon.log().count("cannot write the metrics textfile") == 1


@pytest.mark.parametrize("address", ["127.0.0.1:9464", "[::1]:9464", "localhost:1", "127.1.2.3:65535"])
def test_loopback_addresses_are_accepted(address: str) -> None:
    assert MetricsSettings(http=address).http_address[1] > 0


@pytest.mark.parametrize("table", [{"http": "0.0.0.0:9464"}, {"http": "192.168.1.5:80"}, {"http": "127.0.0.1"},
                                   {"http": "127.0.0.1:0"}, {"http": "[::]:9464"}, {"interval_seconds": 0},
                                   {"interval_seconds": True}, {"textfile": 3}, {"port": 9464}])  # fmt: skip
def test_bad_metrics_settings_are_refused(tmp_path: Path, table: dict) -> None:
    config = tmp_path / "c.toml"
    write_config(config, {"metrics": table})
    with pytest.raises(SettingsError, match="metrics|port"):
        load_settings(config)


def test_the_textfile_follows_the_state_dir() -> None:
    settings = load_settings(None, state_dir=Path("/var/lib/x"))
    assert settings.metrics_textfile == Path("/var/lib/x/metrics/akidb-embed.prom")


def test_the_textfile_is_readable_by_other_users_whatever_the_umask(tmp_path: Path) -> None:
    """node_exporter reads it as a user of its own; the daemon runs with UMask=0007 under systemd."""
    path = tmp_path / "metrics" / "akidb-embed.prom"
    old = os.umask(0o077)
    try:
        write_readable(path, b"akidb_embed_uptime_seconds 1.0\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert [p.name for p in path.parent.iterdir()] == ["akidb-embed.prom"]  # no temporary left behind
