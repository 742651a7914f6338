"""``akidb-embed top``: a live view of the daemon, like htop or jtop, over the normal socket.

Each second it asks for ``status`` and ``models`` and redraws: the memory and where it comes
from, the budget, and per model its state, memory, requests and texts per second, p95, queue and
cache hit rate. ``render`` makes the lines (plain text, so ``--once`` and the tests use it);
the curses loop around it draws them, handles resizes, and quits on ``q`` or Ctrl-C. A daemon
that stops answering is shown as such until it answers again.
"""

from __future__ import annotations

import curses
from collections.abc import Sequence
from typing import Any

from akidb_embed_client import Client, EmbedError

from .modeltable import GIB, MIB, NEVER, scalar, state_cell, table

Frame = tuple[dict[str, Any], list[dict[str, Any]]]  # status, models
HEADERS = ["model", "state", "memory", "qps", "texts/s", "p95", "queue", "hit rate", "requests", "errors"]


def render(frame: Frame | str, socket: str, interval: float) -> list[str]:
    """The view's lines: a frame from the daemon, or why there is none."""
    title = f"akidb-embed top  {socket}  every {interval:g} s, q quits"
    if isinstance(frame, str):
        return [title, "", frame]
    status, models = frame
    memory, budget = status.get("memory", {}), status.get("budget", {})
    states = ", ".join(f"{count} {state}" for state, count in sorted(status.get("models", {}).items())) or "no models"
    cap = budget.get("model_memory_mb") or 0
    lines = [
        title,
        f"daemon {status.get('version', '?')}  pid {status.get('pid', '?')}  up {_duration(status.get('uptime_s'))}",
        f"memory {_gib(memory.get('used'))}/{_gib(memory.get('total'))} GiB used ({_pct(memory.get('pressure'))}) "
        f"from {memory.get('source', '?')}  daemon RSS {_mib(memory.get('own_rss'))}",
        f"models {states}  loaded {budget.get('loaded_models', 0)} holding {budget.get('loaded_memory_mb', 0):.0f} MB"
        f"{f' of {cap} MB' if cap else ''}  queued {status.get('queued_texts', 0)} texts  in flight "
        f"{status.get('in_flight', 0)}  evictions {status.get('evictions', 0)}",
        "",
    ]
    return lines + (table(HEADERS, [_row(m) for m in models]).splitlines() if models else ["no models in the catalog"])


def _row(model: dict[str, Any]) -> list[str]:
    stats = model.get("stats") or {}
    p95 = (stats.get("latency_ms") or {}).get("total", {}).get("p95")
    loaded = model.get("fingerprint") is not None
    return [
        str(model.get("id", "")), state_cell(model),
        f"{model['memory_mb']:.0f} MB" if loaded and model.get("memory_mb") is not None else "-",
        scalar(stats.get("qps")), scalar(stats.get("texts_per_s")), NEVER if p95 is None else f"{p95:.1f} ms",
        scalar(model.get("queued_texts")), NEVER if stats.get("hit_rate") is None else f"{stats['hit_rate']:.0%}",
        scalar(stats.get("requests")), str(sum((stats.get("errors") or {}).values())) if stats else "-",
    ]  # fmt: skip


def fetch(client: Client) -> Frame | str:
    """The daemon's status and models, or a line saying why they did not come."""
    try:
        return client.status(), client.models()
    except EmbedError as exc:
        return f"daemon not answering on {client.socket_path} ({exc.code}); retrying"


def live(client: Client, interval: float) -> None:
    """Show the view until ``q`` or Ctrl-C."""
    try:
        curses.wrapper(_loop, client, interval)
    except KeyboardInterrupt:  # Ctrl-C quits like q; curses.wrapper has restored the terminal
        pass


def _loop(screen: curses.window, client: Client, interval: float) -> None:
    curses.curs_set(0)
    screen.timeout(int(interval * 1000))  # getch waits for a key at most this long: the refresh period
    while True:
        _draw(screen, render(fetch(client), str(client.socket_path), interval))
        if screen.getch() in (ord("q"), ord("Q")):  # a resize (KEY_RESIZE) or no key: draw again
            return


def _draw(screen: curses.window, lines: Sequence[str]) -> None:
    height, width = screen.getmaxyx()
    screen.erase()
    for y, line in enumerate(lines[:height]):
        screen.addnstr(y, 0, line, width - 1)
    screen.refresh()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _gib(count: int | None) -> str:
    return "?" if count is None else f"{count / GIB:.1f}"


def _mib(count: int | None) -> str:
    return "?" if count is None else f"{count / MIB:.0f} MiB"


def _pct(ratio: float | None) -> str:
    return "?" if ratio is None else f"{ratio * 100:.1f}%"
