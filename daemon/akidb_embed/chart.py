"""``akidb-embed bench --plot FILE``: the measured profiles as a chart people would rather look at than read.

Drawn from the ``models`` reply after the bench, so every profiled model shows, not only those just measured.
FILE: p95 latency of one text against quality (the load self-test's lowest cosine to the golden vectors), memory
as the marker's area, one point per model. With sentence-transformers installed, ``FILE-throughput``: each
model's texts/s beside sentence-transformers running the model it was converted from (``baseline.py``).
matplotlib is the optional ``plot`` extra, imported only for ``--plot``, with the Agg backend (no display).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import baseline

INSTALL = "pip install 'akidb-embed[plot]'"
SUFFIXES = (".png", ".svg")
HELP = (
    "also draw FILE (.png or .svg): every profiled model's p95 latency against its quality (golden cosine), memory "
    "as marker size; and, if sentence-transformers is installed, FILE-throughput (same suffix): texts/s beside "
    "sentence-transformers running the model each was converted from (its manifest's [conversion] source), measured "
    f"here on the bench's texts for a few seconds. Needs matplotlib: {INSTALL}"
)
COLORS = {"fp32": "#3b6fb6", "int8": "#e8833a", "fp16": "#4a9a5b"}
OTHER_COLOR, ST_COLOR = "#8c6bb1", "#9a9a9a"
AREA = 1600.0  # points² of the largest memory's marker: areas scale with memory
DPI = 110
STYLE = {"svg.fonttype": "none", "font.size": 9.5, "axes.spines.top": False, "axes.spines.right": False}


@dataclass(frozen=True)
class Point:
    """One profiled model on the latency/quality chart."""

    model: str
    precision: str
    p95_ms: float
    quality: float  # lowest cosine of the self-test
    memory_mb: float

    @property
    def label(self) -> str:
        return f"{self.model} ({self.precision}) · {self.memory_mb:.0f} MB"


@dataclass(frozen=True)
class Bar:
    """One throughput bar: a daemon model, or sentence-transformers on its source."""

    label: str
    color: str
    texts_per_s: float
    batch: int
    versus: float | None = None  # sentence-transformers' texts/s for the same source


def plot_file(text: str) -> Path:
    """``--plot``'s argument: a .png or .svg path; fails before any benchmarking if matplotlib is missing."""
    path = Path(text)
    if path.suffix.lower() not in SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: the chart is PNG or SVG; name the file .png or .svg")
    _pyplot()
    return path


def plot(path: Path, models: list[dict[str, Any]]) -> list[Point]:
    """Draw the charts of ``models`` (the ``models`` reply) to ``path`` (and its throughput file); the points drawn."""
    points, unrated = tradeoff_points(models)
    for model_id in unrated:
        _note(f"{model_id}: no quality figure (no golden vectors), so not on the chart")
    draw_tradeoff(points, unrated, _machine(models), path)
    _note(f"wrote {path}: {len(points)} model(s)")
    if not baseline.installed():
        _note("sentence-transformers is not installed: no throughput chart (pip install sentence-transformers)")
        return points
    throughput = path.with_name(f"{path.stem}-throughput{path.suffix}")
    draw_throughput(throughput_bars(models), _machine(models), throughput)
    _note(f"wrote {throughput}")
    return points


def tradeoff_points(models: list[dict[str, Any]]) -> tuple[list[Point], list[str]]:
    """The profiled models as points, and the ids of those profiled without a quality figure."""
    profiled = [(m, m["profile"]) for m in models if m.get("profile")]
    points = [Point(m["id"], m.get("precision") or "fp32", p["p95_ms"], p["min_cosine"], p["memory_mb"])
              for m, p in profiled if p.get("min_cosine") is not None]  # fmt: skip
    return points, [m["id"] for m, p in profiled if p.get("min_cosine") is None]


def draw_tradeoff(points: list[Point], unrated: list[str], machine: str, path: Path) -> None:
    """Latency (x) against quality (y), marker area by memory, each point labelled with its model and precision."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 5.4), dpi=DPI)
        largest = max((p.memory_mb for p in points), default=1.0) or 1.0
        sizes = [max(30.0, AREA * p.memory_mb / largest) for p in points]
        ax.scatter([p.p95_ms for p in points], [p.quality for p in points], s=sizes, alpha=0.75,
                   c=[COLORS.get(p.precision, OTHER_COLOR) for p in points], edgecolors="#333333",
                   linewidths=0.8, zorder=3, gid="profiles")  # fmt: skip
        ax.margins(x=0.3)
        if points and max(p.p95_ms for p in points) > 10 * min(p.p95_ms for p in points):
            ax.set_xscale("log")
        else:
            ax.set_xlim(left=0)  # latency from nothing: the gaps between models read true
        ax.set_ylim(*_quality_range(points))
        ax.grid(True, color="#e6e6e6", zorder=0)
        ax.yaxis.set_major_formatter("{x:.4f}")
        ax.set_xlabel("p95 latency of one text (ms) — lower is better")
        ax.set_ylabel("quality: lowest cosine to the golden vectors\nhigher is better")
        hint = ax.text(0.01, 0.98, "better ↖", transform=ax.transAxes, color="#777777", va="top")
        top = _headings(fig, "Embedding models on this machine: latency, quality and memory", machine)
        _legends(ax, points, largest)
        _place_labels(fig, ax, points, sizes, hint)
        if unrated:
            fig.text(0.02, 0.01, "not shown, no golden vectors (no quality figure): " + ", ".join(unrated),
                     fontsize=8, color="#777777")  # fmt: skip
        fig.tight_layout(rect=(0, 0.03 if unrated else 0, 1, top))
        fig.savefig(path)
        plt.close(fig)


def throughput_bars(models: list[dict[str, Any]]) -> list[Bar]:
    """Each profiled model's texts/s, and after the models of one source, sentence-transformers' on that source."""
    groups: dict[str, list[dict[str, Any]]] = {}
    sources: dict[str, Path] = {}
    for model in (m for m in models if m.get("profile")):
        source, why = baseline.source_of(model)
        if source is None:
            _note(f"{model['id']}: no sentence-transformers figure: {why}")
        key = str(source) if source else f"id:{model['id']}"
        groups.setdefault(key, []).append(model)
        sources.update({key: source} if source else {})
    bars = []
    for key, members in groups.items():
        batch = max(m["profile"]["batch_texts"] for m in members)
        st_rate = _st_rate(sources[key], batch) if key in sources else None
        bars += [Bar(f"{m['id']} ({m.get('precision') or 'fp32'})", COLORS.get(m.get("precision"), OTHER_COLOR),
                     m["profile"]["texts_per_s"], m["profile"]["batch_texts"], st_rate) for m in members]  # fmt: skip
        if st_rate is not None:
            name = members[0].get("name") or Path(key).name
            bars.append(Bar(f"sentence-transformers ({name})", ST_COLOR, st_rate, batch))
    return bars


def draw_throughput(bars: list[Bar], machine: str, path: Path) -> None:
    """Horizontal bars of texts/s, each model's sentence-transformers bar under it, with the speed-up written on."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 1.9 + 0.42 * max(1, len(bars))), dpi=DPI)
        rows = range(len(bars))
        drawn = ax.barh(rows, [b.texts_per_s for b in bars], color=[b.color for b in bars], height=0.65, zorder=3)
        for row, patch in zip(rows, drawn):
            patch.set_gid(f"throughput-{row}")  # SVG ids: what was drawn can be counted
        ax.set_yticks(list(rows), [b.label for b in bars])
        ax.invert_yaxis()
        top = max((b.texts_per_s for b in bars), default=1.0)
        ax.set_xlim(0, top * 1.45)
        for row, bar in zip(rows, bars):
            ratio = f"  ({bar.texts_per_s / bar.versus:.1f}×)" if bar.versus else ""
            ax.text(bar.texts_per_s + top * 0.01, row, f"{bar.texts_per_s:,.0f}/s, batch {bar.batch}{ratio}",
                    va="center", fontsize=8.5, fontweight="bold" if ratio else "normal")  # fmt: skip
        ax.grid(True, axis="x", color="#e6e6e6", zorder=0)
        ax.set_xlabel("texts per second, one batch of the bench's sample sentences a call — higher is better")
        top = _headings(fig, "Throughput: akidb-embed beside sentence-transformers", f"{machine}\n(n×): the rate over "
                        "sentence-transformers' (torch, in this process) on the model it was converted from, same texts")
        fig.tight_layout(rect=(0, 0, 1, top))
        fig.savefig(path)
        plt.close(fig)


def _headings(fig: Any, title: str, subtitle: str) -> float:
    """A bold title and a grey subtitle flush left at the top; the fraction of the height left for the plot."""
    inch = 1 / fig.get_figheight()
    fig.text(0.015, 1 - 0.12 * inch, title, fontweight="bold", fontsize=12, va="top")
    fig.text(0.015, 1 - 0.42 * inch, subtitle, color="#555555", fontsize=8.5, va="top", linespacing=1.5)
    return 1 - (0.62 + 0.2 * subtitle.count("\n")) * inch


def _st_rate(source: Path, batch: int) -> float:
    """sentence-transformers' texts/s on ``source``, on the bench's sample texts and for as long as the bench."""
    from .profile import SAMPLE, THROUGHPUT_ROUNDS, THROUGHPUT_SECONDS  # loads ONNX Runtime: only when needed

    _note(f"sentence-transformers: timing {source} in this process, batches of {batch}, {THROUGHPUT_SECONDS:g}s")
    texts = [SAMPLE[i % len(SAMPLE)] for i in range(batch)]
    return baseline.texts_per_s(source, texts, THROUGHPUT_SECONDS, THROUGHPUT_ROUNDS)


def _legends(ax: Any, points: list[Point], largest: float) -> None:
    """Beside the plot: a legend for the colours (precision) and one for the marker areas (memory)."""
    precisions = sorted({p.precision for p in points})
    colours = [ax.scatter([], [], s=60, c=COLORS.get(name, OTHER_COLOR), label=name) for name in precisions]
    first = ax.legend(handles=colours, title="precision", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.add_artist(first)
    steps = sorted({_round_down(largest), _round_down(largest / 4)} - {0.0})
    sizes = [ax.scatter([], [], s=AREA * mb / largest, c="none", edgecolors="#555555", label=f"{mb:g} MB")
             for mb in steps]  # fmt: skip
    ax.legend(handles=sizes, title="memory", loc="lower left", bbox_to_anchor=(1.01, 0), frameon=False,
              labelspacing=2.2, borderpad=1.2, handletextpad=1.6)  # fmt: skip


def _place_labels(fig: Any, ax: Any, points: list[Point], sizes: list[float], hint: Any) -> None:
    """Label each point beside its marker, at the first spot that overlaps no other label, marker or the hint."""
    fig.canvas.draw()  # the renderer measures the labels
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72
    markers = []
    for point, size in zip(points, sizes):
        x, y = ax.transData.transform((point.p95_ms, point.quality))
        r = math.sqrt(size) / 2 * scale
        markers.append((x - r, y - r, x + r, y + r))
    taken = [tuple(hint.get_window_extent(renderer).extents)]
    for point, size, own in zip(points, sizes, markers):
        r = math.sqrt(size) / 2 + 4
        obstacles = taken + [m for m in markers if m is not own]
        label = None
        for dx, dy, ha, va in _spots(r):
            label = ax.annotate(point.label, (point.p95_ms, point.quality), xytext=(dx, dy),
                                textcoords="offset points", ha=ha, va=va, fontsize=9, zorder=4)  # fmt: skip
            box = label.get_window_extent(renderer).extents
            inside = ax.bbox.x0 <= box[0] and box[2] <= ax.bbox.x1 and ax.bbox.y0 <= box[1] and box[3] <= ax.bbox.y1
            if inside and not any(_overlap(box, other) for other in obstacles):
                break
            label.remove()
            label = None
        if label is None:  # nowhere free: the first spot, overlapping
            dx, dy, ha, va = _spots(r)[0]
            label = ax.annotate(point.label, (point.p95_ms, point.quality), xytext=(dx, dy),
                                textcoords="offset points", ha=ha, va=va, fontsize=9, zorder=4)  # fmt: skip
        taken.append(tuple(label.get_window_extent(renderer).extents))


def _spots(r: float) -> list[tuple[float, float, str, str]]:
    """Offsets in points around a marker of radius ``r``: right, left, above, below, then the diagonals."""
    d = r * 0.75
    return [(r, 0, "left", "center"), (-r, 0, "right", "center"), (0, r, "center", "bottom"),
            (0, -r, "center", "top"), (d, d, "left", "bottom"), (-d, d, "right", "bottom"),
            (d, -d, "left", "top"), (-d, -d, "right", "top")]  # fmt: skip


def _quality_range(points: list[Point]) -> tuple[float, float]:
    """The quality axis: from a little below the lowest cosine to just above 1, where a cosine ends."""
    low = min((p.quality for p in points), default=0.99)
    span = max(1.0 - low, 0.002)
    return low - 0.3 * span, 1.0 + 0.12 * span


def _overlap(a: Any, b: Any) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _round_down(mb: float) -> float:
    """``mb`` rounded down to 1, 2 or 5 times a power of ten, for the size legend."""
    if mb <= 0:
        return 0.0
    power = 10 ** math.floor(math.log10(mb))
    return float(max(step for step in (1, 2, 5) if step * power <= mb) * power)


def _machine(models: list[dict[str, Any]]) -> str:
    """The subtitle: this machine's CPU, the providers the profiles ran on and when they were measured."""
    profiles = [m["profile"] for m in models if m.get("profile")]
    providers = sorted({str(p["provider"]).removesuffix("ExecutionProvider") for p in profiles})
    when = time.strftime("%Y-%m-%d", time.localtime(max((p["measured_at"] for p in profiles), default=time.time())))
    return f"{_cpu()} · ONNX Runtime {', '.join(providers) or '-'} · akidb-embed bench, {when}"


def _cpu() -> str:
    """The CPU's model name from /proc/cpuinfo (absent on many ARM boards: then the architecture)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} × {len(names)}" if names else platform.machine()


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or an argparse error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as exc:
        raise argparse.ArgumentTypeError(f"drawing the chart needs matplotlib ({exc}); install it: {INSTALL}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _note(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
