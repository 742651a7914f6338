#!/usr/bin/env python3
"""Benchmark: the daemon over its socket beside in-process ONNX Runtime, same model, same texts.

The in-process baseline is our own stack without the daemon (tokenizer, ONNX Runtime session,
pooling, normalization in this process): the ceiling the socket path is judged against.
The memory section puts the daemon's resident size beside the footprint it charges a model,
and, given --before-src (another checkout), the same figures and throughput of that daemon.
Usage: scripts/bench.py --catalog .dev/models.d [CATALOG ...] [--model all-minilm-l6-v2] [--texts 512]
       [--sections latency cache memory] [--before-src DIR] [--rounds 2]
(scripts/dev.sh creates that catalog.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-daemon runner the tests use

from akidb_embed import pooling  # noqa: E402
from akidb_embed.backend import DeviceMemory, OnnxBackend  # noqa: E402
from akidb_embed.batcher import CPU_BATCH_COST_TOKENS, cut_batches  # noqa: E402
from akidb_embed.manifest import Manifest, load_manifest  # noqa: E402
from akidb_embed.engine import Engine  # noqa: E402
from akidb_embed.memory import MIB, MemoryMonitor  # noqa: E402
from akidb_embed.registry import Registry  # noqa: E402
from akidb_embed.settings import Limits, load_settings  # noqa: E402
from akidb_embed.state import StateStore  # noqa: E402
from akidb_embed_client.errors import UnknownModel  # noqa: E402
from akidb_embed.tokenize import TextEncoder  # noqa: E402
from akidb_embed_client import Client  # noqa: E402
from bench_memory import memory_columns, print_memory_table  # noqa: E402
from benchutil import BULK, bulk_rate, latencies_ms, p50, p95, progress, timed_ms  # noqa: E402
from daemon_process import run_daemon  # noqa: E402
from fortunes import fortune_sentences  # noqa: E402

CONCURRENT = 16
SECTIONS = ("latency", "cache", "memory")
DEFAULT_MODEL = "all-minilm-l6-v2"


class InProcess:
    """The same model run directly in this process, batched the way the daemon batches."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.encoder = TextEncoder(manifest.tokenizer, manifest.max_length, manifest.padding_side)
        self.backend = OnnxBackend(manifest.model, ["cpu"], Path("/tmp"), DeviceMemory(0, 0))

    def embed(self, texts: list[str]) -> None:
        encoded = sorted(self.encoder.encode(texts), key=lambda t: len(t.ids))
        lengths = [len(t.ids) for t in encoded]
        for start, stop in cut_batches(lengths, token_budget_fits, CPU_BATCH_COST_TOKENS):
            padded = self.encoder.pad(encoded[start:stop])
            vectors = pooling.pool(self.backend.run(padded), padded.mask, self.manifest.pooling)
            if self.manifest.normalize:
                pooling.l2_normalize(vectors)


def token_budget_fits(rows: int, length: int) -> bool:
    """The daemon's batch limits without its memory budget: the baseline keeps the plain token rule."""
    limits = Limits()
    return rows <= limits.max_batch and rows * length <= limits.batch_tokens


def paired_latencies_ms(
    first: Callable[[list[str]], object], second: Callable[[list[str]], object], texts: list[str]
) -> tuple[list[float], list[float]]:
    """Single-text latencies of two paths taking turns on each text, so drift hits both alike."""
    a, b = [], []
    for text in texts:
        a += latencies_ms(first, [text])
        b += latencies_ms(second, [text])
    return a, b


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


def row(name: str, ours: float, base: float, unit: str, target: str) -> str:
    ratio = ours / base if base else float("nan")
    return f"{name:<34} {ours:>10.2f} {base:>10.2f} {unit:<8} {ratio:>6.2f}  {target}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, nargs="+", default=[REPO / ".dev" / "models.d"])
    parser.add_argument("--model", help=f"manifest id in each catalog (default: {DEFAULT_MODEL}, else the catalog's only one)")
    parser.add_argument("--texts", type=int, default=512, help="real sentences per measurement")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--before-src", type=Path, help="another checkout: the memory section runs its daemon too")
    parser.add_argument("--rounds", type=int, default=2, help="bulk rounds per daemon in the memory section (median)")
    args = parser.parse_args()
    manifests = [(catalog, catalog_manifest(catalog, args.model)) for catalog in args.catalog]
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores")
    for catalog, manifest in manifests:
        if "latency" in args.sections:
            latency_section(catalog, manifest, fortune_sentences(args.texts))
        if "cache" in args.sections:
            cache_section(catalog, manifest)
    if "memory" in args.sections:
        columns = []
        for catalog, manifest in manifests:
            columns += memory_columns(catalog, manifest, args.before_src, args.rounds)
        print_memory_table(columns)
    return 0


def catalog_manifest(catalog: Path, model: str | None) -> Manifest:
    """The model benchmarked in a catalog: the one named, the default one, or the only one."""
    if model is not None or (catalog / f"{DEFAULT_MODEL}.toml").is_file():
        return load_manifest(catalog / f"{model or DEFAULT_MODEL}.toml")
    paths = sorted(catalog.glob("*.toml"))
    if len(paths) != 1:
        raise SystemExit(f"bench: {catalog} holds {len(paths)} manifests; name one with --model")
    return load_manifest(paths[0])


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (ARM kernels may not give one)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def latency_section(catalog: Path, manifest: Manifest, texts: list[str]) -> None:
    """Single texts, concurrent clients and bulk: the daemon beside in-process ONNX Runtime."""
    progress(f"{len(texts)} sentences from Debian's fortunes, model {manifest.id}")
    progress("in-process: warm-up, bulk")
    local = InProcess(manifest)
    local.embed(texts[:BULK])
    local_bulk = bulk_rate(local.embed, texts)

    progress("daemon: start, warm-up")
    with run_daemon(catalog, providers=["cpu"]) as daemon, Client(daemon.socket, timeout=60) as client:
        def remote(batch: list[str]) -> object:
            return client.embed(batch, model=manifest.id)

        remote(texts[:BULK])
        progress("daemon and in-process in turn: sequential single texts")
        daemon_single, local_single = paired_latencies_ms(remote, local.embed, texts)
        progress(f"daemon: {CONCURRENT} concurrent clients")
        daemon_concurrent, concurrent_ms = concurrent_rate(daemon.socket, manifest.id, texts)
        progress("daemon: bulk")
        daemon_bulk = bulk_rate(remote, texts)

    sequential_rate = 1e3 / statistics.mean(daemon_single)
    print(f"\n{'latency: ' + manifest.id:<34} {'daemon':>10} {'in-proc':>10} {'unit':<8} {'ratio':>6}  target")
    print(row("single text p50", p50(daemon_single), p50(local_single), "ms", "≤ in-proc + 0.5 ms"))
    print(row("single text p95", p95(daemon_single), p95(local_single), "ms", ""))
    print(f"{'  p50 overhead':<34} {p50(daemon_single) - p50(local_single):>10.3f} {'':>10} ms")
    print(row(f"bulk {BULK} texts/request", daemon_bulk, local_bulk, "texts/s", "≥ 0.90"))
    print(row(f"{CONCURRENT} clients vs daemon sequential", daemon_concurrent, sequential_rate, "texts/s", "> 1.00"))
    print(f"{'  concurrent call p50':<34} {p50(concurrent_ms):>10.2f} {'':>10} ms")


def cache_section(catalog: Path, manifest: Manifest) -> None:
    """Loads, hot-add, routing overhead and RSS around a load/unload."""
    cache = cache_figures(manifest)
    routing_us = routing_overhead_us(catalog, manifest.id)
    print(f"\n{'model cache: ' + manifest.id:<34} {'value':>10} {'':>10} {'unit':<8} {'':>6}  target")
    for name, value, unit, target in [
        ("first load (measures footprint)", cache["first_load_ms"], "ms", ""),
        ("cold load p50 (first request)", p50(cache["cold_ms"]), "ms", "≤ 300 ms"),
        ("hot-add p50 (rename → embed)", p50(cache["hot_add_ms"]), "ms", "≤ 1000 ms"),
        ("routing overhead per request", routing_us, "µs", "≤ 200 µs"),
        ("RSS before load", cache["rss_before"] / MIB, "MiB", ""),
        ("RSS loaded", cache["rss_loaded"] / MIB, "MiB", ""),
        ("RSS after unload", cache["rss_after"] / MIB, "MiB", "≈ before"),
    ]:
        print(f"{name:<34} {value:>10.2f} {'':>10} {unit:<8} {'':>6}  {target}")


def cache_figures(manifest: Manifest, cycles: int = 10) -> dict:
    """First and cold loads, hot-add latency and RSS around a load/unload, on a catalog of its own."""
    figures: dict = {"cold_ms": [], "hot_add_ms": []}
    with tempfile.TemporaryDirectory(prefix="akb-") as tmp:
        catalog = Path(tmp) / "models.d"
        catalog.mkdir()
        (catalog / f"{manifest.id}.toml").write_text(manifest_text(manifest, manifest.id))
        progress("model cache: first load, cold loads, RSS")
        with run_daemon(catalog, providers=["cpu"]) as daemon, Client(daemon.socket, timeout=120) as client:
            figures["rss_before"] = settled_rss(client)
            figures["first_load_ms"] = timed_ms(lambda: client.embed("first", model=manifest.id))
            figures["rss_loaded"] = settled_rss(client)
            for _ in range(cycles):
                client.unload(manifest.id)
                figures["cold_ms"].append(timed_ms(lambda: client.embed("cold", model=manifest.id)))
            client.unload(manifest.id)
            figures["rss_after"] = settled_rss(client)
            progress("model cache: hot-add")
            for i in range(5):
                figures["hot_add_ms"].append(hot_add_ms(client, catalog, manifest, f"hot-{i}"))
    return figures


def hot_add_ms(client: Client, catalog: Path, manifest: Manifest, model_id: str) -> float:
    """Manifest renamed into place → first successful embed."""
    staging = catalog.parent / f"{model_id}.toml.tmp"
    staging.write_text(manifest_text(manifest, model_id))
    started = time.perf_counter()
    os.replace(staging, catalog / f"{model_id}.toml")
    while True:
        try:
            client.embed("hot", model=model_id)
            return (time.perf_counter() - started) * 1e3
        except UnknownModel:
            time.sleep(0.005)


def manifest_text(manifest: Manifest, model_id: str) -> str:
    """The manifest under another id, with absolute paths so it can live in any folder."""
    text = manifest.path.read_text()
    text = re.sub(r'(?m)^id = ".*"$', f'id = "{model_id}"', text)
    text = re.sub(r'(?m)^model = ".*"$', f'model = "{manifest.model}"', text)
    return re.sub(r'(?m)^tokenizer = ".*"$', f'tokenizer = "{manifest.tokenizer}"', text)


def settled_rss(client: Client) -> int:
    time.sleep(0.5)  # an unload finishes on the loader thread
    return client.status()["memory"]["own_rss"]


def routing_overhead_us(catalog: Path, model_id: str, rounds: int = 20000) -> float:
    """What the daemon adds around the batcher per request: checks, registry acquire and release."""
    settings = load_settings(None, catalog=catalog, providers=["cpu"])

    async def measure() -> float:
        with tempfile.TemporaryDirectory() as state:
            registry = Registry(settings, MemoryMonitor(None), StateStore(Path(state)))
            registry.scan()
            engine = Engine(settings, registry)
            registry.release(await registry.acquire(model_id))  # loaded outside the timing
            fields = {"texts": ["a routed request"], "model": model_id}
            started = time.perf_counter()
            for _ in range(rounds):
                model = await registry.acquire(engine._checked_texts(fields["texts"]) and fields["model"])
                engine._job(model.manifest, fields["texts"], fields, time.monotonic())
                registry.release(model, 1)
            elapsed = time.perf_counter() - started
            await registry.close()
            return elapsed / rounds * 1e6

    return asyncio.run(measure())



if __name__ == "__main__":
    sys.exit(main())
