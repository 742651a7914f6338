"""The benchmark's memory section: the daemon's resident size beside the footprint it charges.

For each model: RSS idle, after one short text, after the worst request the limits allow (sent
three times), 10 s later; the charge and its parts; bulk throughput. Given another checkout
(``--before-src``), its daemon runs beside this one on the same texts, in turns.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from akidb_embed.manifest import Manifest
from akidb_embed.settings import Limits
from akidb_embed.tomlcompat import tomllib
from akidb_embed_client import Client
from benchutil import BULK, bulk_rate, p50, proc_status_mib, progress, timed_ms
from daemon_process import Daemon, run_daemon, write_config
from fortunes import fortune_sentences
from tokenizers import Tokenizer

MEMORY_TEXTS = 1024  # fortunes per bulk round
WORST_SENDS = 3
IDLE_SECONDS = 10.0
RATIO_TARGET = 1.1

@dataclass
class Subject:
    """One daemon in the memory section, a column of its table."""

    label: str
    model: str
    client: Client
    pid: int
    figures: dict[str, float | None] = field(default_factory=dict)
    worst_s: list[float] = field(default_factory=list)
    bulk: list[float] = field(default_factory=list)

    def embed(self, texts: list[str]) -> object:
        return self.client.embed(texts, model=self.model)


@contextlib.contextmanager
def source_daemon(catalog: Path, source: Path | None) -> Iterator[Daemon]:
    """The daemon of this checkout, or of the checkout ``source`` (its packages first on the path)."""
    env = None
    with tempfile.TemporaryDirectory(prefix="akidb-before-") as older:
        if source is not None:
            # PYTHONPATH comes before the venv's editable installs of this checkout.
            paths = [str(source / "daemon"), str(source / "client"), os.environ.get("PYTHONPATH", "")]
            env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
            catalog = older_catalog(catalog, Path(older), env)
        with run_daemon(catalog, providers=["cpu"], env=env) as daemon:
            yield daemon


def older_catalog(catalog: Path, folder: Path, env: dict[str, str]) -> Path:
    """``catalog`` as an older daemon reads it: only the manifest fields it knows (an older one refuses
    newer fields such as ``precision``), with model and tokenizer paths made absolute."""
    known = subprocess.run([sys.executable, "-c", "from akidb_embed.manifest import _FIELDS; print(*_FIELDS)"],
                           env=dict(os.environ, **env), check=True, capture_output=True, text=True).stdout.split()
    for path in catalog.glob("*.toml"):
        data = tomllib.loads(path.read_text())
        for key in ("model", "tokenizer"):
            data[key] = str((path.parent / data[key]).resolve())
        write_config(folder / path.name, {key: value for key, value in data.items() if key in known})
    return folder


def memory_columns(catalog: Path, manifest: Manifest, before: Path | None, rounds: int) -> list[dict[str, Any]]:
    """RSS, charge and bulk throughput of the model in this checkout's daemon (and the one in ``before``)."""
    worst = worst_texts(manifest, Limits().max_texts)
    texts = fortune_sentences(MEMORY_TEXTS)
    sources = [(manifest.id, None)] + ([(f"{manifest.id} before", before)] if before else [])
    with contextlib.ExitStack() as stack:
        subjects = []
        for label, source in sources:
            progress(f"memory: start {label}")
            daemon = stack.enter_context(source_daemon(catalog, source))
            client = stack.enter_context(Client(daemon.socket, timeout=600))
            subjects.append(Subject(label, manifest.id, client, client.status()["pid"]))
        for subject in subjects:
            progress(f"memory: {subject.label}: idle, one short text (the first load)")
            subject.figures["rss_idle"] = settled_rss_mib(subject.pid)
            subject.embed(["a short text"])
            subject.figures["rss_one"] = settled_rss_mib(subject.pid)
        worst_batches(subjects, worst)
        for subject in subjects:
            subject.figures.update(charge_figures(subject.client.models(), subject.model))
        bulk_rounds(subjects, texts, rounds)
    return [column(subject) for subject in subjects]


def worst_batches(subjects: list[Subject], worst: list[str]) -> None:
    """The worst request WORST_SENDS times to each daemon in turn; RSS right after and IDLE_SECONDS later."""
    timers = []
    for send in range(WORST_SENDS):
        for subject in subjects:
            progress(f"memory: {subject.label}: worst request {send + 1}/{WORST_SENDS}")
            subject.worst_s.append(timed_ms(lambda: subject.embed(worst)) / 1e3)
            if send == WORST_SENDS - 1:
                subject.figures["rss_worst"] = settled_rss_mib(subject.pid)
                subject.figures["rss_peak"] = proc_status_mib(subject.pid, "VmHWM")
                # A timer, so one daemon's idle wait overlaps the other's last request.
                timer = threading.Timer(IDLE_SECONDS - 0.5, note_later_rss, args=(subject,))
                timer.start()
                timers.append(timer)
    progress(f"memory: {IDLE_SECONDS:.0f} s idle")
    for timer in timers:
        timer.join()


def note_later_rss(subject: Subject) -> None:
    subject.figures["rss_later"] = proc_status_mib(subject.pid, "VmRSS")


def bulk_rounds(subjects: list[Subject], texts: list[str], rounds: int) -> None:
    """Bulk rounds taking turns, the order flipped each round, so drift and noise hit every daemon alike."""
    for subject in subjects:
        subject.embed(texts[:BULK])
    for n in range(rounds):
        for subject in subjects if n % 2 == 0 else subjects[::-1]:
            progress(f"memory: {subject.label}: bulk round {n + 1}/{rounds}")
            subject.bulk.append(bulk_rate(subject.embed, texts))


def charge_figures(models: list[dict[str, Any]], model_id: str) -> dict[str, float | None]:
    """The charge and its parts as the models reply gives them (an older daemon has only the charge)."""
    (info,) = [info for info in models if info["id"] == model_id]
    return {key: info.get(key) for key in ("memory_mb", "weights_mb", "work_mb", "peak_mb")}


def column(subject: Subject) -> dict[str, Any]:
    """A subject's figures, with the ratio of the RSS a worst batch leaves to the charge."""
    figures = dict(subject.figures, label=subject.label, worst_s=p50(subject.worst_s), bulk=p50(subject.bulk))
    charge = figures["memory_mb"]
    figures["ratio"] = (figures["rss_worst"] - figures["rss_idle"]) / charge if charge else None
    return figures


def worst_texts(manifest: Manifest, count: int) -> list[str]:
    """``count`` distinct texts of fortune words, each over max_length tokens: the largest request allowed."""
    tokenizer = Tokenizer.from_file(str(manifest.tokenizer))
    tokenizer.no_truncation()  # a tokenizer.json may truncate on its own; the count must go past max_length
    words = " ".join(fortune_sentences(10 * MEMORY_TEXTS)).split()
    texts: list[str] = []
    start = 0
    while len(texts) < count:
        stop = start + 16
        while len(tokenizer.encode(" ".join(words[start:stop])).ids) <= manifest.max_length:
            if stop > len(words):
                raise SystemExit(f"bench: not enough fortunes for {count} texts of {manifest.max_length} tokens")
            stop += 16
        texts.append(" ".join(words[start:stop]))
        start = stop  # no word shared: the texts are distinct
    return texts


def settled_rss_mib(pid: int) -> float:
    time.sleep(0.5)  # the batcher trims the heap after it replies
    return proc_status_mib(pid, "VmRSS")


def print_memory_table(columns: list[dict[str, Any]]) -> None:
    """The memory figures side by side, one column per model and daemon."""
    width = max(12, *(len(c["label"]) for c in columns))
    before = {c["label"].removesuffix(" before"): c for c in columns if c["label"].endswith(" before")}
    for c in columns:
        after = c["label"] in before
        c["bulk_ratio"] = c["bulk"] / before[c["label"]]["bulk"] if after else None
        c["worst_ratio"] = c["worst_s"] / before[c["label"]]["worst_s"] if after else None
    print(f"\n{'memory (MiB)':<34} " + " ".join(f"{c['label']:>{width}}" for c in columns) + "  target")
    for key, name, target in [
        ("rss_idle", "RSS idle (no model)", ""),
        ("rss_one", "RSS after one short text", ""),
        ("rss_worst", f"RSS after worst request x{WORST_SENDS}", ""),
        ("rss_peak", "RSS peak (VmHWM)", ""),
        ("rss_later", f"RSS {IDLE_SECONDS:.0f} s later, idle", ""),
        ("memory_mb", "charged (memory_mb)", ""),
        ("weights_mb", "  weights_mb", ""),
        ("work_mb", "  work_mb", ""),
        ("peak_mb", "  peak_mb", ""),
        ("ratio", "(RSS worst - idle) / charged", f"≤ {RATIO_TARGET:.2f}"),
        ("worst_s", "worst request p50 (s)", ""),
        ("worst_ratio", "  vs before", ""),
        ("bulk", f"bulk {BULK} texts/request (texts/s)", ""),
        ("bulk_ratio", "  vs before", ""),
    ]:
        cells = " ".join(f"{'-' if c.get(key) is None else format(c[key], '.2f'):>{width}}" for c in columns)
        print(f"{name:<34} {cells}  {target}")
    limits = Limits()
    print(f"worst request: {limits.max_texts} distinct texts over max_length tokens; "
          f"bulk: {MEMORY_TEXTS} fortunes, median of the rounds")
