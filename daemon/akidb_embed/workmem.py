"""Working memory of inference batches: the cost model batches are cut by, and its measurement.

A batch of ``rows`` texts padded to ``length`` tokens needs transient memory (activations) of

    rows × length × token_bytes  +  rows × length² × pair_bytes

The first term comes from the hidden and intermediate widths (the tensors of a layer live at
once, per token); the second from attention, whose score tensors are heads × length² per row,
so long texts must get smaller batches than short ones. The shape (``config.json`` beside the
model) gives the prior; the first load replaces it with coefficients fitted to measured peaks
(``footprint``). ``PeakMeter`` keeps measuring batches while the daemon serves, and
``HeapGuard`` trims the heap when fragments of earlier batches push the process past its charges.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .memory import peak_rss, process_rss, reset_peak_rss, trim_heap

FLOAT_BYTES = 4
# Live tensors per token in one layer: residual, normed, Q, K, V, attention output, plus the
# intermediate (FFN) activation before and after its non-linearity.
HIDDEN_TENSORS, INTERMEDIATE_TENSORS = 7, 2
# Live tensors per (head, query, key) triple: the scores, the masked scores, the softmax.
PAIR_TENSORS = 3


@dataclass(frozen=True)
class ModelShape:
    """What the transient memory of a transformer depends on (not its depth: layers run one at a time)."""

    hidden: int
    heads: int
    intermediate: int


def read_shape(model_dir: Path) -> ModelShape | None:
    """The shape from the HF ``config.json`` beside the model (encoder or decoder names); None if absent."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        hidden = int(config.get("hidden_size") or config["d_model"])
        return ModelShape(
            hidden=hidden,
            heads=int(config["num_attention_heads"]),
            intermediate=int(config.get("intermediate_size") or 4 * hidden),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class CostModel:
    """Transient bytes of one inference batch, by rows and padded length."""

    token_bytes: float
    pair_bytes: float

    @classmethod
    def from_shape(cls, shape: ModelShape) -> CostModel:
        """The prior before any measurement: one layer's tensors live at a time."""
        token = FLOAT_BYTES * (HIDDEN_TENSORS * shape.hidden + INTERMEDIATE_TENSORS * shape.intermediate)
        return cls(float(token), float(FLOAT_BYTES * PAIR_TENSORS * shape.heads))

    def batch_bytes(self, rows: int, length: int) -> int:
        return int(rows * length * (self.token_bytes + length * self.pair_bytes))

    def max_rows(self, length: int, budget: int) -> int:
        """The most rows of ``length`` tokens whose batch fits ``budget`` bytes (0: not even one)."""
        one = self.batch_bytes(1, length)
        return budget // one if one else 1 << 30


@dataclass(frozen=True)
class BatchRule:
    """Which batches may run: within the row and padded-token limits and the working-memory budget."""

    max_rows: int
    max_tokens: int
    cost: CostModel
    work: int  # bytes

    def fits(self, rows: int, length: int) -> bool:
        """Whether ``rows`` texts padded to ``length`` tokens make an allowed batch."""
        return rows <= self.max_rows and rows * length <= self.max_tokens and self.cost.batch_bytes(rows, length) <= self.work


def fit(samples: list[tuple[int, int, int]]) -> CostModel:
    """Coefficients from measured ``(rows, length, peak bytes)``, scaled so no sample is under-predicted."""
    terms = np.array([(r * n, r * n * n) for r, n, _ in samples], dtype=np.float64)
    peaks = np.array([p for _, _, p in samples], dtype=np.float64)
    coef, *_ = np.linalg.lstsq(terms, peaks, rcond=None)
    if coef.min() < 0:  # one term does not show (a fused attention has no length² tensor): fit the other alone
        keep = int(np.argmax(coef))
        coef = np.zeros(2)
        coef[keep] = max(0.0, float(terms[:, keep] @ peaks) / float(terms[:, keep] @ terms[:, keep]))
    predicted = terms @ coef
    shortfall = max((p / q for p, q in zip(peaks, predicted) if q > 0), default=1.0)
    coef = coef * max(1.0, shortfall)
    return CostModel(float(coef[0]), float(coef[1]))


@dataclass
class Reading:
    """What ``PeakMeter.measure`` saw: bytes above the resident size at the start, if it could tell."""

    peak: int | None = None


class PeakMeter:
    """The transient memory of each batch that runs alone in the process.

    Peak RSS is process-wide, so a batch is measured only when nothing else (another model's
    batch, a load) ran at any moment during it; that is how one model's growth is never booked
    to another. Memory the heap kept from earlier batches is reused without showing, so a
    reading is a lower bound: the daemon-wide check in ``upkeep`` covers the rest.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._shared = False  # someone else ran during the lone activity
        self.enabled = reset_peak_rss()  # a sandbox may forbid /proc/self/clear_refs

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        """Around one activity; the reading gets its peak in bytes if it ran alone."""
        reading = Reading()
        with self._lock:
            self._active += 1
            alone = self._active == 1 and self.enabled
            if alone:
                self._shared = False
                before = process_rss()
                reset_peak_rss()
            else:
                self._shared = True
        try:
            yield reading
        finally:
            with self._lock:
                self._active -= 1
                if alone and not self._shared:
                    reading.peak = max(0, peak_rss() - before)


class HeapGuard:
    """Keeps the resident size at batch boundaries within the idle daemon plus the models' charges.

    Freed activations stay on the heap for the next batch to reuse, which is what keeps batches
    fast; but batches of other shapes leave fragments the next cannot use (measured: +14 MiB
    over 128 identical batches of int8 MiniLM), so past the limit the heap is trimmed.
    """

    def __init__(self) -> None:
        self.limit = 0  # bytes; 0 until the registry sets it

    def after_batch(self) -> None:
        if self.limit and process_rss() > self.limit:
            trim_heap()


METER = PeakMeter()
GUARD = HeapGuard()
