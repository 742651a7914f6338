"""Speed settings of one model on this machine: ONNX Runtime's intra-op threads and the batch cut.

Measured at the first load of a fingerprint (in the footprint child, after its memory) or on
request (``akidb-embed tune``), and stored with the footprint, because what suits one CPU does
not suit another: the thread count that runs a batch fastest, the fixed cost of one run (which
decides when padding rows to a longer text pays: a few tokens' worth on a CPU, hundreds on a
GPU), and the batch size past which a larger batch runs each token slower (caches overflow).
Every batch measured here fits the model's working-memory budget: ``fits`` is the batcher's own rule.
Timings are the fastest of a few repeats, since other work on the machine only ever adds time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backend import ORT_NAMES, OnnxBackend
from .tokenize import Padded

SHORT_TOKENS = 16  # one short text: the latency case
BULK_TOKENS = 32  # rows of a bulk batch: typical sentences
BULK_ROWS = 32
SCALE_ROWS = (1, 4, 16, 64)  # batches of short texts whose times separate a run's fixed cost from its per-token cost
# Larger batches this much slower per token than the best are not worth making. Not less: on a
# busy 2-core VM the fastest of several runs still scattered by up to 1.4x between tunings, and a
# false cut costs throughput for good.
SLOWER = 1.5
REPEAT_SECONDS = 0.25  # time spent on repeats of one shape (at least MIN_REPEATS)
MIN_REPEATS, MAX_REPEATS = 2, 7

Fits = Callable[[int, int], bool]  # (rows, padded length) -> within the limits and the working budget


@dataclass(frozen=True)
class Tuning:
    """How the batcher runs a model here."""

    threads: int  # ONNX Runtime intra-op threads (0: its own choice)
    run_cost_tokens: int  # a run's fixed cost, in tokens of compute
    batch_tokens: int  # padded tokens of one batch beyond which the rate per token drops
    threads_setting: int  # the configured intra_op_threads it was tuned for (0: automatic)


def tune(session_with: Callable[[int], OnnxBackend], token_ids: list[int], fits: Fits, threads_setting: int,
         batch_tokens: int) -> Tuning:
    """Measure and choose; ``session_with(threads)`` builds the model's session, ``token_ids`` is one long text."""
    candidates = thread_candidates(_cores()) if threads_setting == 0 else [threads_setting]
    threads = candidates[0]
    backend = session_with(threads)
    if backend.providers[0] != ORT_NAMES["cpu"]:  # a GPU runs the model: CPU threads only feed it, there is nothing to choose
        threads = threads_setting
    elif len(candidates) > 1:
        del backend  # one session at a time: a large model's weights fit once, perhaps not twice
        threads = _fastest_threads(session_with, candidates, token_ids, fits)
        backend = session_with(threads)
    run_cost, best_batch = _batch_costs(backend, token_ids, fits)
    return Tuning(threads, run_cost, min(batch_tokens, best_batch), threads_setting)


def thread_candidates(cores: int) -> list[int]:
    """1, the powers of two below the core count, half of it and all of it."""
    powers = {1 << i for i in range(cores.bit_length()) if 1 << i <= cores}
    return sorted(powers | {max(1, cores // 2), cores})


def _cores() -> int:
    """Cores this process may run on (a cgroup or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


def _fastest_threads(session_with: Callable[[int], OnnxBackend], candidates: list[int], token_ids: list[int],
                     fits: Fits) -> int:
    """The thread count that runs a short text and a bulk batch fastest, the two weighing alike."""
    timed = [(threads, _score(session_with(threads), token_ids, fits)) for threads in candidates]
    best = [min(score[i] for _, score in timed) for i in range(2)]
    return min(timed, key=lambda item: sum(t / b for t, b in zip(item[1], best)))[0]


def _score(backend: OnnxBackend, token_ids: list[int], fits: Fits) -> list[float]:
    """Seconds of one short text and of one bulk batch."""
    rows = max((r for r in range(1, BULK_ROWS + 1) if fits(r, BULK_TOKENS)), default=1)
    return _fastest(backend, token_ids, [(1, SHORT_TOKENS), (rows, BULK_TOKENS)])


def _batch_costs(backend: OnnxBackend, token_ids: list[int], fits: Fits) -> tuple[int, int]:
    """A run's fixed cost in tokens and the padded size past which batches run slower per token."""
    shapes = [rows for rows in SCALE_ROWS if fits(rows, SHORT_TOKENS)]
    tokens = np.array([rows * SHORT_TOKENS for rows in shapes], dtype=np.float64)
    seconds = np.array(_fastest(backend, token_ids, [(rows, SHORT_TOKENS) for rows in shapes]))
    if len(shapes) < 2:
        return 0, 1 << 62
    # The two smallest batches: what padding competes with is one more small run.
    per_token = max(1e-12, (seconds[1] - seconds[0]) / (tokens[1] - tokens[0]))
    run_cost = int(round(max(0.0, seconds[0] - tokens[0] * per_token) / per_token))
    rates = seconds / tokens
    slow = rates > rates.min() * SLOWER
    if len(shapes) < 3 or not (slow[-1] and slow[-2]):  # one slow figure may be noise: never cut on it
        return run_cost, 1 << 62
    return run_cost, max(int(n) for n, is_slow in zip(tokens, slow) if not is_slow)


def _fastest(backend: OnnxBackend, token_ids: list[int], shapes: list[tuple[int, int]]) -> list[float]:
    """The fastest run, in seconds, of each ``(rows, length)`` batch.

    The shapes take turns round after round, so a burst of other work on the machine slows
    them alike instead of making one look slower than it is.
    """
    batches = [_batch(token_ids, rows, length) for rows, length in shapes]
    for batch in batches:
        backend.run(batch)  # the first run of a shape allocates and plans
    fastest = [float("inf")] * len(batches)
    rounds, spent = 0, 0.0
    while rounds < MIN_REPEATS or (spent < REPEAT_SECONDS * len(batches) and rounds < MAX_REPEATS):
        for i, batch in enumerate(batches):
            started = time.perf_counter()
            backend.run(batch)
            took = time.perf_counter() - started
            fastest[i], spent = min(fastest[i], took), spent + took
        rounds += 1
    return fastest


def _batch(token_ids: list[int], rows: int, length: int) -> Padded:
    ids = np.array([token_ids[:length]] * rows, dtype=np.int64)
    return Padded(ids, np.ones_like(ids))
