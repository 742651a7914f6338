"""A model's memory, measured at its first load in a child process: weights, working budget, worst batch.

The child (``python -m akidb_embed.footprint``) builds the session exactly as the daemon does,
takes the resident size it added as the weights, fits the working-memory cost model
(``workmem``) to the peaks of a few calibration batches, settles the working budget, and runs
the worst batches the budget and the limits allow, alone and then in a burst as a long request
would run them, keeping the largest peak. A process of its
own is what makes the figures per model: nothing else loads or runs in it. The charge the
cache books is weights + the larger of the budget and the peak.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backend import BackendError, DeviceMemory, OnnxBackend
from .memory import MIB, peak_rss, process_rss, release_memory, reset_peak_rss, tune_malloc
from .tokenize import Padded
from .tuning import Tuning, tune
from .workmem import BatchRule, CostModel, ModelShape, fit, read_shape

AUTO_FLOOR_MB = 64  # automatic budget: one text of max_length, and at least this (for batches of short texts)
SHORT_TOKENS = 16  # a short text: batches of many rows
CALIBRATION_ROUNDS = 3
BURST_BATCHES = 16
Run = Callable[..., int]  # run((rows, tokens), ...) -> peak bytes of those batches back to back


@dataclass(frozen=True)
class Footprint:
    """What one model holds, in bytes, and the cost model its batches are cut by."""

    weights: int  # resident after load: session, initializers, tokenizer
    work: int  # working-memory budget of one batch
    peak: int  # the largest working memory measured: one batch, or a burst with the heap's fragments
    token_bytes: float
    pair_bytes: float
    work_mb: int  # the setting it was measured for (0: automatic)
    tuning: Tuning  # threads and batch cut, measured with it

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Footprint:
        """From ``asdict``'s form (the child's answer, the state file); KeyError or TypeError if fields are missing."""
        return cls(**{**data, "tuning": Tuning(**data["tuning"])})

    @property
    def charge(self) -> int:
        return self.weights + max(self.work, self.peak)

    @property
    def cost(self) -> CostModel:
        return CostModel(self.token_bytes, self.pair_bytes)


@dataclass(frozen=True)
class Request:
    """What the child needs to build and measure the model as the daemon would."""

    model: str
    tokenizer: str
    max_length: int
    padding_side: str
    dimension: int
    work_mb: int  # 0: automatic
    max_batch: int
    batch_tokens: int
    intra_op_threads: int  # the setting: 0 tunes it
    providers: tuple[str, ...] = ("cpu",)  # the chain the model will run on: tuning times it there
    engine_cache: str = "."


def measure_in_child(request: Request) -> Footprint:
    """Run the measurement in a fresh interpreter; a BackendError carries the child's reason."""
    done = subprocess.run(
        [sys.executable, "-m", "akidb_embed.footprint", json.dumps(asdict(request))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise BackendError(lines[-1])
    return Footprint.from_dict(json.loads(done.stdout))


def measure(request: Request) -> Footprint:
    """The measurement itself (in the child): weights, cost model, budget, worst allowed batches."""
    import onnxruntime  # noqa: F401  (the runtime is the daemon's, imported at its start: not the model's)

    from .tokenize import TextEncoder

    baseline = process_rss()
    encoder = TextEncoder(Path(request.tokenizer), request.max_length, request.padding_side)
    backend = OnnxBackend(Path(request.model), ["cpu"], Path(), DeviceMemory(0, 0), request.intra_op_threads)
    longest = encoder.encode([" ".join(["memory"] * request.max_length)])[0].ids.tolist()
    length = len(longest)  # max_length, unless the tokenizer adds nothing and the text is shorter

    def run(*batches: tuple[int, int]) -> int:
        """Peak bytes of ``(rows, tokens)`` batches run back to back from a trimmed heap."""
        release_memory()
        before = process_rss()
        reset_peak_rss()
        for rows, tokens in batches:
            ids = np.array([longest[:tokens]] * rows, dtype=np.int64)
            backend.run(Padded(ids, np.ones_like(ids)))
        return max(0, peak_rss() - before)

    run((2, min(SHORT_TOKENS, length)))  # first runs initialize kernels: not batch memory
    release_memory()
    weights = process_rss() - baseline
    shape = read_shape(Path(request.model).parent) or _shape_from_dimension(request.dimension)
    prior = CostModel.from_shape(shape)
    measurable = reset_peak_rss()  # else peaks cannot be measured here: the shape's prior stands
    samples = _calibration(run, length, request.max_batch, prior) if measurable else []
    cost = fit(samples) if samples else prior
    one = samples[0][2] if samples else prior.batch_bytes(1, length)
    work = request.work_mb * MIB if request.work_mb else max(AUTO_FLOOR_MB * MIB, math.ceil(one / MIB) * MIB)
    if one > work:
        raise BackendError(
            f"one text of max_length {length} tokens needs ~{math.ceil(one / MIB)} MiB of working memory and "
            f"work_mb is {request.work_mb}: raise work_mb (manifest or [limits]) or lower max_length"
        )
    if measurable:
        cost, peak = _settle_worst_batches(run, samples, cost, length, work, request)
    else:
        peak = one
    del backend
    rule = BatchRule(request.max_batch, request.batch_tokens, cost, work)
    tuning = _tune(request, longest, rule, DeviceMemory(weights + max(work, peak), work))
    return Footprint(weights, work, max(one, peak), cost.token_bytes, cost.pair_bytes, request.work_mb, tuning)


def _tune(request: Request, longest: list[int], rule: BatchRule, memory: DeviceMemory) -> Tuning:
    """Threads and batch cut timed on the model's own provider chain, within the budget just settled."""

    def session_with(threads: int) -> OnnxBackend:
        return OnnxBackend(Path(request.model), request.providers, Path(request.engine_cache), memory, threads)

    return tune(session_with, longest, rule.fits, request.intra_op_threads, request.batch_tokens)


def _settle_worst_batches(
    run: Run, samples: list[tuple[int, int, int]], cost: CostModel, length: int, work: int, request: Request
) -> tuple[CostModel, int]:
    """Run the largest batch the limits allow at a few lengths; the cost model and the largest peak.

    A batch that outgrows the budget joins the samples and the model is refitted to cover it, so
    the batcher cuts such a batch smaller; a few rounds settle it. Then those batches run back to
    back, BURST_BATCHES of them, as a long request runs them: what the heap keeps between batches of different
    shapes (fragments it cannot reuse) is part of the peak.
    """
    for _ in range(CALIBRATION_ROUNDS):
        batches = [(rows, n) for n in _lengths(length) if (rows := _worst_rows(cost, n, work, request))]
        worst = [(rows, n, run((rows, n))) for rows, n in batches]
        over = [(rows, n, peak) for rows, n, peak in worst if peak > work and rows > 1]
        if not over:
            break
        samples = samples + over
        cost = fit(samples)
    burst = [batches[i % len(batches)] for i in range(BURST_BATCHES)] if batches else []
    return cost, max(run(*burst), *(peak for _, _, peak in worst))


def _calibration(run: Run, length: int, max_batch: int, prior: CostModel) -> list[tuple[int, int, int]]:
    """Peaks ``(rows, length, bytes)`` of batches that separate the cost terms; one text of max_length first."""
    short = min(SHORT_TOKENS, length)
    many = max(1, min(max_batch, prior.max_rows(short, prior.batch_bytes(1, length))))
    shapes = [(1, length), (2, max(1, length // 2)), (4, max(1, length // 4)), (many, short)]
    return [(rows, n, max(run((rows, n)), run((rows, n)))) for rows, n in shapes]


def _lengths(length: int) -> list[int]:
    return sorted({length, max(1, length // 2), max(1, length // 4), min(SHORT_TOKENS, length)}, reverse=True)


def _worst_rows(cost: CostModel, length: int, work: int, request: Request) -> int:
    """The most rows of ``length`` tokens the batcher would put in one batch."""
    return min(request.max_batch, request.batch_tokens // length, cost.max_rows(length, work))


def _shape_from_dimension(dimension: int) -> ModelShape:
    """No config.json: a BERT-like guess from the output width (calibration corrects it)."""
    return ModelShape(hidden=dimension, heads=max(1, dimension // 64), intermediate=4 * dimension)


def main(argv: list[str]) -> int:
    tune_malloc()  # as the daemon does: the same heap behaviour
    answer = os.fdopen(os.dup(1), "w")  # stdout carries the answer alone: ONNX Runtime prints provider errors there
    os.dup2(2, 1)
    try:
        footprint = measure(Request(**json.loads(argv[1])))
    except Exception as exc:  # the parent shows the last stderr line as the load error: one line
        print(" ".join(str(exc).split()) or type(exc).__name__, file=sys.stderr)
        return 1
    print(json.dumps(asdict(footprint)), file=answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
