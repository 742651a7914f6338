"""Soak: many clients for minutes on one real daemon; its memory and descriptors must stay flat, no request lost.

``--clients`` threads (32) each send, for ``--duration`` seconds (600), a mix of embed (1 to 16 texts),
models, status, load and unload across two tiny models, each request on the reference client (a REQ
socket, one try of ``--timeout`` seconds). Every ``--every`` seconds the daemon's VmRSS and open
descriptors are sampled (and with ``--settle-every``, the RSS once every client paused and the models trimmed the heap:
what the daemon keeps, apart from what the allocator holds between batches). Reported: each op's count by outcome (ok, an error code, or ``lost``: no reply
in time), and RSS and fds over the steady window (from ``--warmup`` seconds, 120, to the end): first,
last, min, max, the spread (max - min) / min and the drift between the window's first and last quarters.
Exit status 1 when a request was lost or a drift is over 5 %.

  PYTHONPATH=daemon:client python scripts/soak.py --duration 600
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-daemon runner and tiny models the tests use

from akidb_embed_client import Client, errors  # noqa: E402
from daemon_process import run_daemon  # noqa: E402
from procwatch import open_fds, rss_kib, two_model_catalog  # noqa: E402

MODELS = ("bge-tiny", "qwen3-tiny")
WORDS = "the quick brown fox jumps over lazy dog search engine finds documents rice paris weather".split()
# Op weights: mostly embeds, with enough loads and unloads that models come and go all the time.
MIX = {"embed": 70, "models": 8, "status": 8, "load": 7, "unload": 7}
FLAT = 0.05
SETTLE_SECONDS = 2.5  # a model idle for a second trims the heap (batcher.py)


class Tally:
    """Outcomes per op, from every client thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, op: str, outcome: str) -> None:
        with self.lock:
            self.counts[f"{op} {outcome}"] += 1

    def lost(self) -> int:
        return sum(n for key, n in self.counts.items() if key.endswith(" lost"))


def send_one(client: Client, op: str, rng: random.Random) -> None:
    """One request of the mix; raises what the client raises."""
    model = rng.choice(MODELS)
    if op == "embed":
        client.embed([" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(rng.randint(1, 16))], model)
    elif op in ("load", "unload"):
        getattr(client, op)(model)
    else:
        getattr(client, op)()


class Pause:
    """Lets the sampler stop every client between two requests, to see the daemon's memory once it settles."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.go.set()
        self.busy = threading.Semaphore(0)  # released by a client on each request it finishes while paused

    def settled(self, pid: int, clients: int, seconds: float) -> int:
        """Every client stopped, ``seconds`` of quiet (models idle a second trim the heap): the RSS then."""
        self.go.clear()
        for _ in range(clients):
            self.busy.acquire()
        time.sleep(seconds)
        rss = rss_kib(pid)
        self.go.set()
        return rss


def client_loop(socket: Path, seed: int, stop: threading.Event, tally: Tally, timeout: float, pause: Pause) -> None:
    """Requests back to back until ``stop``; each one's outcome is tallied."""
    rng = random.Random(seed)
    with Client(socket, timeout=timeout, retries=1) as client:
        while not stop.is_set():
            if not pause.go.is_set():
                pause.busy.release()
                pause.go.wait()
            op = rng.choices(list(MIX), weights=list(MIX.values()))[0]
            try:
                send_one(client, op, rng)
                tally.add(op, "ok")
            except errors.Unavailable:  # no reply within the timeout: the request is lost
                tally.add(op, "lost")
            except errors.EmbedError as exc:  # an error reply is an answer (a model unloaded mid-load, say)
                tally.add(op, exc.code)


def spread(values: list[int]) -> dict[str, float]:
    """First, last, min, max, the spread (max - min) / min, and the drift: the mean of the last quarter of the
    series over that of its first quarter, less one (a leak grows it; a model loading or unloading as a sample
    is taken moves single samples, not the quarters' means)."""
    low, high = min(values), max(values)
    quarter = max(1, len(values) // 4)
    head, tail = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
    return {"first": values[0], "last": values[-1], "min": low, "max": high,
            "spread": round((high - low) / low, 4), "drift": round(tail / head - 1, 4)}  # fmt: skip


def soak(args: argparse.Namespace, catalog: Path) -> dict:
    """Run the clients against a daemon on ``catalog``; the figures."""
    tally, stop, pause = Tally(), threading.Event(), Pause()
    samples: list[tuple[float, int, int]] = []
    settled: list[tuple[float, int]] = []  # (seconds, RSS after a pause)
    with run_daemon(catalog) as daemon:
        pid = daemon.process.pid
        threads = [threading.Thread(target=client_loop, args=(daemon.socket, seed, stop, tally, args.timeout, pause))
                   for seed in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while (elapsed := time.monotonic() - started) < args.duration:
            samples.append((elapsed, rss_kib(pid), open_fds(pid)))
            print(f"soak: {elapsed:5.0f} s  rss {samples[-1][1] / 1024:6.1f} MiB  fds {samples[-1][2]:4d}  "
                  f"requests {sum(tally.counts.values()):7d}  lost {tally.lost()}", file=sys.stderr, flush=True)
            if args.settle_every and len(samples) % round(args.settle_every / args.every) == 0:
                settled.append((elapsed, pause.settled(pid, args.clients, SETTLE_SECONDS)))
            time.sleep(min(args.every, max(0.0, args.duration - elapsed)))
        stop.set()
        for thread in threads:
            thread.join(args.timeout + 5)
        with daemon.client() as client:
            status = client.status()
    steady = [s for s in samples if s[0] >= args.warmup] or samples[-1:]
    settled_steady = [rss for when, rss in settled if when >= args.warmup]
    return {
        "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "samples": len(samples),
        "requests": sum(tally.counts.values()), "lost": tally.lost(), "outcomes": dict(sorted(tally.counts.items())),
        "rss_kib": spread([s[1] for s in steady]), "fds": spread([s[2] for s in steady]),
        "settled_rss_kib": spread(settled_steady) if settled_steady else None,
        "dropped_replies": status["dropped_replies"],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before the steady window")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--settle-every", type=float, default=0.0,
                        help="seconds between pauses of every client, after which the settled RSS is taken (0: none)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take before it is lost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="akd-soak-") as root:
        figures = soak(args, two_model_catalog(Path(root)))
    print(json.dumps(figures, indent=2))
    flat = all(abs(figures[key]["drift"]) <= FLAT for key in ("rss_kib", "fds"))
    return 0 if flat and figures["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
