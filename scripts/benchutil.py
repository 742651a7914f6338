"""What the benchmark scripts share: progress lines, timing in turns, rates, percentiles, cosines, RSS,
targets, and the precision and package versions they report."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from akidb_embed.manifest import Manifest
from akidb_embed.memory import MIB
from akidb_embed.tomlcompat import tomllib
from akidb_embed_client import Client

BULK = 32
CONCURRENT = 16

Embed = Callable[[list[str]], Any]  # texts -> vectors (or anything, when only timed)
T = TypeVar("T")


def progress(message: str) -> None:
    """A progress line on stderr (results go to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def latencies_ms(call: Embed, texts: list[str]) -> list[float]:
    """Round trip of each single-text call, in milliseconds."""
    out = []
    for text in texts:
        started = time.perf_counter()
        call([text])
        out.append((time.perf_counter() - started) * 1e3)
    return out


def rotated(items: list[T], turn: int) -> list[T]:
    """``items`` starting one further along each turn, so no path always runs right after the same one."""
    start = turn % len(items) if items else 0
    return items[start:] + items[:start]


def latencies_in_turns_ms(calls: list[Embed], texts: list[str]) -> list[list[float]]:
    """Single-text latencies of several paths taking turns on each text, so drift hits all alike."""
    out: list[list[float]] = [[] for _ in calls]
    for turn, text in enumerate(texts):
        for index, call in rotated(list(enumerate(calls)), turn):
            out[index] += latencies_ms(call, [text])
    return out


def bulk_rate(call: Embed, texts: list[str], per_call: int = BULK) -> float:
    """Texts per second when sent ``per_call`` at a time."""
    started = time.perf_counter()
    for i in range(0, len(texts), per_call):
        call(texts[i : i + per_call])
    return len(texts) / (time.perf_counter() - started)


def concurrent_rate(socket: Path, model: str, texts: list[str]) -> tuple[float, list[float]]:
    """Texts per second and per-call latencies with CONCURRENT clients sending one text each."""
    shares = [texts[i::CONCURRENT] for i in range(CONCURRENT)]
    results: list[list[float]] = [[] for _ in shares]

    def client_loop(n: int) -> None:
        with Client(socket, timeout=60, retries=1) as client:
            results[n] = latencies_ms(lambda batch: client.embed(batch, model=model), shares[n])

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(CONCURRENT)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return len(texts) / elapsed, [ms for share in results for ms in share]


def embed_all(call: Embed, texts: list[str]) -> np.ndarray:
    """The vectors of all ``texts``, sent BULK at a time, as one float32 array."""
    chunks = [np.asarray(call(texts[i : i + BULK]), dtype=np.float32) for i in range(0, len(texts), BULK)]
    return np.concatenate(chunks)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``got`` with the same row of ``want``."""
    dots = (got.astype(np.float64) * want).sum(axis=1)
    return dots / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def p50(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


def p95(values: list[float]) -> float:
    """The 95th percentile."""
    return statistics.quantiles(values, n=20)[-1]


def p99(values: list[float]) -> float:
    """The 99th percentile."""
    return statistics.quantiles(values, n=100)[-1]


def timed_ms(call: Callable[[], object]) -> float:
    """How long one call took, in milliseconds."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e3


def proc_status_mib(pid: int, key: str) -> float:
    """A figure of /proc/<pid>/status (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024 / MIB
    raise KeyError(key)


def bulk_rss_mib(make_embed: Callable[[], Embed], texts: list[str]) -> dict[str, float]:
    """In this process: build an embed path, send ``texts`` BULK at a time; RSS then, and the peak (VmHWM)."""
    bulk_rate(make_embed(), texts)
    return {"rss_after_bulk": proc_status_mib(os.getpid(), "VmRSS"), "rss_peak": proc_status_mib(os.getpid(), "VmHWM")}


def daemon_rss_mib(client: Client) -> dict[str, float]:
    """The daemon's RSS now (its status reply) and its peak so far (VmHWM of its process)."""
    status = client.status()
    return {"rss_after_bulk": status["memory"]["own_rss"] / MIB, "rss_peak": proc_status_mib(status["pid"], "VmHWM")}


def in_fresh_process(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a newly spawned Python process: its memory figures are its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


@dataclass(frozen=True)
class Target:
    """One line of the targets: a figure of this run against its limit."""

    name: str
    value: float | None  # None: a figure it needs was not measured
    limit: float
    at_least: bool
    unit: str = "x"

    def verdict(self) -> str:
        """PASS or MISS against the limit, SKIP without a value."""
        if self.value is None:
            return "SKIP"
        return "PASS" if (self.value >= self.limit if self.at_least else self.value <= self.limit) else "MISS"


def print_targets(targets: list[Target]) -> None:
    """Each target: its value, its limit and PASS, MISS or SKIP."""
    print(f"\n{'targets (this run)':<46} {'value':>12} {'target':>12}")
    for target in targets:
        value = "-" if target.value is None else f"{target.value:.4g}{target.unit}"
        limit = f"{'≥' if target.at_least else '≤'} {target.limit:g}{target.unit}"
        print(f"{target.name:<46} {value:>12} {limit:>12}  {target.verdict()}")


def manifest_precision(manifest: Manifest) -> str:
    """The manifest's `precision` field, else int8 when its comments, model path or id say int8 or quantized, else fp32."""
    text = manifest.path.read_text(encoding="utf-8")
    stated = tomllib.loads(text).get("precision")
    if stated:
        return str(stated)
    comments = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    hints = f"{comments} {manifest.model} {manifest.id}".lower()
    return "int8" if "int8" in hints or "quantiz" in hints else "fp32"


def package_version(module: str) -> str | None:
    """The installed version of the distribution that provides ``module`` (onnxruntime may come as onnxruntime-gpu)."""
    names = importlib.metadata.packages_distributions().get(module, [])
    return importlib.metadata.version(names[0]) if names else None
