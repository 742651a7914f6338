"""Live-daemon fuzz: random and mutated request frames from several clients at once (tests/framefuzz.py).

A daemon on two tiny models gets ``--frames`` frames (100,000) from ``--clients`` clients (8: DEALER and REQ in
turn), for ``--seconds`` at most. Reported: frames sent and answered, the replies by code, failures (a frame
without a reply or with two, a reply that is not a map, ``internal`` or an unknown code), the daemon's RSS before
and after, and whether it still serves. Exit status 1 on any failure.

  PYTHONPATH=daemon:client python scripts/fuzz.py --frames 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-daemon runner, the tiny models and the fuzzer the tests use

from daemon_process import run_daemon  # noqa: E402
from framefuzz import Figures, run_fuzz  # noqa: E402
from procwatch import open_fds, rss_kib, two_model_catalog  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1800.0, help="stop sending after this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()

    def progress(figures: Figures) -> None:
        elapsed = time.monotonic() - started
        print(f"fuzz: {elapsed:6.0f} s  sent {figures.sent:7d}  answered {figures.answered:7d}  "
              f"({figures.answered / max(elapsed, 1e-9):5.0f}/s)  failures {len(figures.failures)}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="akd-fuzz-") as root, run_daemon(two_model_catalog(Path(root))) as daemon:
        pid = daemon.process.pid
        before = {"rss_kib": rss_kib(pid), "fds": open_fds(pid)}
        figures = run_fuzz(daemon.socket, args.frames, args.clients, args.seed, args.seconds, progress)
        after = {"rss_kib": rss_kib(pid), "fds": open_fds(pid)}
        with daemon.client() as client:
            serving = client.embed(["still serving"], "bge-tiny").shape == (1, 32)
            dropped = client.status()["dropped_replies"]
        alive = daemon.alive()
    report = {
        "frames": args.frames, "clients": args.clients, "seconds": round(time.monotonic() - started, 1),
        "sent": figures.sent, "answered": figures.answered, "outcomes": dict(figures.outcomes.most_common()),
        "failures": figures.failures, "before": before, "after": after, "dropped_replies": dropped,
        "alive": alive, "serving_after": serving,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    ok = not figures.failures and figures.sent == figures.answered == args.frames and alive and serving
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
