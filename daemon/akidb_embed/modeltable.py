"""How the command line shows models: the ``models`` table (``--wide`` for every column), the models that fit
(``models --fits``), the one-line summary of ``load``, ``unload``, ``pin``, ``unpin`` and ``tune``, and the
profiles of ``bench``.

Each column is a header and a function of one model's entry in the ``models`` reply. A figure
the daemon did not send (an older daemon, a model never profiled, an empty window) shows ``—``
or ``-``, never a made-up value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

MIB = 1024 * 1024
GIB = 1024 * MIB
NEVER = "—"  # no profile measured for this version: nothing to show, not a guess

Model = dict[str, Any]
# The models reply's verification, as the "verified" column shows it ("-": a daemon without self-tests).
_VERIFIED = {"passed": "yes", "unverified": "unverified", "pending": "pending", "failed": "FAILED"}


def models_table(models: Sequence[Model], now: float | None = None, wide: bool = False) -> str:
    """One row per model, then the error of each model that has one."""
    if not models:
        return "no models in the catalog"
    now = time.time() if now is None else now
    columns = [(header, cell) for header, cell, in_narrow in _columns(now) if wide or in_narrow]
    rows = [[cell(m) for _, cell in columns] for m in models]
    errors = [f"{m.get('id')}: {m['error']}" for m in models if m.get("error")]
    return "\n".join([table([header for header, _ in columns], rows), *([""] + errors if errors else [])])


def profiles_table(profiles: Sequence[tuple[str, Model]]) -> str:
    """One row per benchmarked model: (id, profile) pairs."""
    headers = ["id", *(header for header, _ in _PROFILE_COLUMNS)]
    return table(headers, [[model_id, *(cell(p) for _, cell in _PROFILE_COLUMNS)] for model_id, p in profiles])


def fits_table(fits: dict[str, Any]) -> str:
    """The models that fit, best first, then the others with the constraint each failed."""
    fitting = [[str(i + 1), c["id"], c["judged_on"], c["prompt"] or "", str(c["dimensions"] or "")]
               for i, c in enumerate(fits["fitting"])]  # fmt: skip
    rejected = [[r["id"], r["reason"]] for r in fits["rejected"]]
    return "\n".join([
        table(["#", "fits", "judged on", "prompt", "dimensions"], fitting) if fitting else "no model fits",
        *(["", table(["does not fit", "why"], rejected)] if rejected else []),
    ])  # fmt: skip


def model_summary(m: Model) -> str:
    """One line: id, state, pinned, memory, load time and keep-alive, then the error if any."""
    keep_alive = m.get("keep_alive")
    parts = [
        f"{m.get('id')}: {m.get('state')}",
        "pinned" if m.get("pinned") else "not pinned",
        f"memory {memory_cell(m)}" + (f" ({m['memory_source']})" if m.get("memory_source") else ""),
        "load -" if m.get("load_ms") is None else f"load {m['load_ms']:.0f} ms",
        "keep-alive " + ("-" if keep_alive is None else "forever" if keep_alive < 0 else f"{keep_alive:g}s"),
    ]
    if m.get("threads") is not None:
        parts.append(f"{m['threads'] or 'auto'} threads, batches up to {m['batch_tokens']} tokens")
    return ", ".join(parts) + (f"; error: {m['error']}" if m.get("error") else "")


def state_cell(model: Model) -> str:
    """The state, and the circuit when it is not closed: refused after failures, tried again in so many seconds."""
    state, circuit = str(model.get("state", "")), model.get("circuit") or {}
    if circuit.get("state", "closed") == "closed":
        return state
    retry = circuit.get("retry_after_ms")
    return f"{state}, circuit {circuit['state'].replace('_', '-')}" + (f" {retry / 1e3:.0f}s" if retry else "")


def _columns(now: float) -> list[tuple[str, Callable[[Model], str], bool]]:
    """(header, cell, shown without --wide) of the models table, in order."""
    return [
        ("id", lambda m: str(m.get("id", "")), True),
        ("state", state_cell, True),
        ("verified", lambda m: _VERIFIED.get(m.get("verification"), "-"), True),
        ("pinned", lambda m: "*" if m.get("pinned") else "", True),
        ("memory", memory_cell, True),
        ("weights/work/peak", parts_cell, False),
        ("last used", lambda m: ago(m.get("last_used"), now), True),
        ("in-flight", lambda m: scalar(m.get("in_flight")), False),
        ("requests", lambda m: scalar(m.get("requests")), True),
        ("qps", lambda m: scalar(_stats(m).get("qps")), False),
        ("p95 now", lambda m: _ms(_stats(m).get("latency_ms", {}).get("total", {}).get("p95")), False),
        ("hit rate", lambda m: _percent(_stats(m).get("hit_rate")), False),
        ("errors", lambda m: str(sum(_stats(m)["errors"].values())) if "errors" in _stats(m) else "-", False),
        *((header, _profiled(cell), header in ("p95", "texts/s")) for header, cell in _PROFILE_COLUMNS),
        ("dim", lambda m: scalar(m.get("dimension")), True),
        ("default", lambda m: "*" if m.get("default") else "", True),
    ]


_PROFILE_COLUMNS: list[tuple[str, Callable[[Model], str]]] = [
    ("provider", lambda p: str(p["provider"]).removesuffix("ExecutionProvider")),
    ("cold load", lambda p: f"{p['cold_load_ms']:.0f} ms"),
    ("p50", lambda p: _ms(p["p50_ms"])),
    ("p95", lambda p: _ms(p["p95_ms"])),
    ("texts/s", lambda p: f"{p['texts_per_s']:.0f}"),
    ("batch", lambda p: str(p["batch_texts"])),
    ("quality", lambda p: NEVER if p.get("min_cosine") is None else f"{p['min_cosine']:.4f}"),
    ("measured", lambda p: ago(p["measured_at"], time.time())),
]


def _stats(m: Model) -> dict[str, Any]:
    """The model's live statistics (empty from a daemon that sends none)."""
    return m.get("stats") or {}


def _profiled(cell: Callable[[Model], str]) -> Callable[[Model], str]:
    """A profile column of the models table: ``—`` for a model never profiled."""
    return lambda m: cell(m["profile"]) if m.get("profile") else NEVER


def memory_cell(m: Model) -> str:
    """A model's memory in MB, with ``~`` when it is an estimate rather than measured."""
    mb = None if m.get("memory_source") == "unknown" else m.get("memory_mb")
    return "-" if mb is None else f"{'' if m.get('memory_source') == 'measured' else '~'}{mb:.0f} MB"


def parts_cell(m: Model) -> str:
    """A loaded model's charge in parts: resident weights / working budget / largest batch seen, in MB."""
    parts = [m.get(key) for key in ("weights_mb", "work_mb", "peak_mb")]
    return "-" if None in parts else "/".join(f"{mb:.0f}" for mb in parts) + " MB"


def human_bytes(count: float) -> str:
    """Bytes as GiB from 1 GiB up, else MiB."""
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / MIB:.0f} MiB"


def ago(stamp: float | None, now: float) -> str:
    """How long ago a Unix time was, in its largest whole unit: ``12s ago``, ``5m ago``."""
    if stamp is None:
        return "-"
    elapsed = max(0.0, now - stamp)
    unit, size = next(((u, n) for u, n in (("d", 86400), ("h", 3600), ("m", 60)) if elapsed >= n), ("s", 1))
    return f"{int(elapsed // size)}{unit} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned fixed-width columns separated by two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def scalar(value: Any) -> str:
    """A value as a cell: ``-`` for none, lists joined."""
    if value is None or value == {}:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(scalar(item) for item in value) or "-"
    return str(value)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"
