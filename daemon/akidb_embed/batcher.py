"""Per-model queue and batching: the one thread that runs a model's ONNX session.

Requests from any number of clients queue here as ``Job``s. The worker thread takes what is
waiting (up to ``max_batch`` texts), tokenizes it, sorts the texts by length, cuts batches
whose working memory (``workmem`` cost model: long texts get fewer rows) stays within the
model's budget and whose padded size stays within the token budget, runs them, pools, and
hands each job its vectors in input order on the event loop. A failing batch fails only the
jobs that had texts in it; the thread logs and carries on. Each batch that runs alone in the
process has its peak measured; a second after the last one, the freed heap goes back to the system.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from akidb_embed_client.errors import EmbedError, InputTooLong, InternalError, Overloaded, ShuttingDown

from . import pooling
from .backend import Backend
from .footprint import Footprint
from .memory import MIB, trim_heap
from .settings import Limits
from .tokenize import TextEncoder, Tokens
from .workmem import GUARD, METER, BatchRule, Reading

log = logging.getLogger(__name__)

# A model idle this long hands its batches' memory back. Not after every batch: the next request
# of a burst would fault all of it in again.
IDLE_TRIM_SECONDS = 1.0


@dataclass(frozen=True)
class Embedded:
    """A finished job: one vector per text, in input order, and each text's token count."""

    vectors: np.ndarray
    tokens: list[int]


@dataclass
class Job:
    """One embed request, prompt already applied; settled exactly once through ``future``."""

    texts: list[str]
    future: asyncio.Future
    truncate: bool = True
    normalize: bool = True
    dimensions: int | None = None
    deadline: float = float("inf")  # time.monotonic() after which nobody waits for it
    tokens: list[int] = field(default_factory=list)
    # time.monotonic() when it was queued, taken by the worker, and done: its queue wait and inference time
    queued: float = 0.0
    started: float = 0.0
    finished: float = 0.0


@dataclass(frozen=True)
class _Row:
    job: int
    index: int
    tokens: Tokens


class Batcher:
    """A bounded queue of jobs for one model and the worker thread that serves it."""

    def __init__(
        self,
        name: str,
        encoder: TextEncoder,
        backend: Backend,
        pooling_mode: str,
        dimension: int,
        limits: Limits,
        footprint: Footprint,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.dimension = dimension
        tuning = footprint.tuning  # measured for this model on this machine
        self.batch_cost_tokens = tuning.run_cost_tokens
        self.rule = BatchRule(limits.max_batch, min(limits.batch_tokens, tuning.batch_tokens), footprint.cost, footprint.work)
        self.encoder = encoder
        self.backend = backend
        self.pooling = pooling_mode
        self.limits = limits
        self.work = footprint.work
        self.peak_seen = 0  # bytes: the largest batch measured running alone
        self.loop = loop
        self._jobs: deque[Job] = deque()
        self._queued_texts = 0
        self.batches_run = 0  # inference batches; fewer than requests when requests share batches
        self._closed = False
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._work, name=f"model:{name}", daemon=True)
        self._thread.start()

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def submit(self, job: Job) -> None:
        """Queue a job, or raise Overloaded at once when the queue is full."""
        with self._wakeup:
            if self._closed:
                raise ShuttingDown(f"model {self.name} is shutting down; retry")
            if self._queued_texts + len(job.texts) > self.limits.queue_texts:
                raise Overloaded(
                    f"model {self.name} has {self._queued_texts} texts queued (limit {self.limits.queue_texts}); "
                    "retry later or raise limits.queue_texts"
                )
            job.queued = time.monotonic()
            self._jobs.append(job)
            self._queued_texts += len(job.texts)
            self._wakeup.notify()

    def close(self) -> None:
        """Stop taking jobs; the thread finishes what is queued, then exits."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join()

    def _work(self) -> None:
        used_memory = False  # batches ran since the heap was last trimmed
        while (jobs := self._take(IDLE_TRIM_SECONDS if used_memory else None)) is not None:
            if not jobs:  # idle for a while after work: its memory goes back to the system
                trim_heap()
                used_memory = False
                continue
            try:
                self._serve(jobs)
            except Exception as exc:  # the thread must outlive any one bad batch
                log.exception("model %s: batch failed", self.name)
                self._settle([(job, InternalError(f"inference failed on {self.name}: {exc}")) for job in jobs])
            used_memory = True

    def _take(self, idle_timeout: float | None) -> list[Job] | None:
        """Block for work, then take what waits, up to max_batch texts (at least one job).

        None once closed; an empty list when ``idle_timeout`` seconds pass without work.
        """
        with self._wakeup:
            while not self._jobs and not self._closed:
                if not self._wakeup.wait(idle_timeout):
                    return []
            if not self._jobs:
                return None
            jobs = [self._jobs.popleft()]
            count = len(jobs[0].texts)
            while self._jobs and count + len(self._jobs[0].texts) <= self.limits.max_batch:
                jobs.append(self._jobs.popleft())
                count += len(jobs[-1].texts)
            self._queued_texts -= count
        started = time.monotonic()
        for job in jobs:
            job.started = started
        return jobs

    def _serve(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        settled: list[tuple[Job, Embedded | EmbedError]] = []
        live = []
        for job in jobs:
            if job.future.done():  # cancelled: answered already (shutdown), nothing to compute
                continue
            if job.deadline < now:  # its client gave up (and may have resent it)
                settled.append((job, Overloaded(f"the request waited past its timeout_ms for {self.name}; retry")))
            else:
                live.append(job)
        rows, refused = self._tokenize(live)
        settled += refused
        failed: dict[int, EmbedError] = {}
        outputs = {j: np.empty((len(job.texts), self.dimension), np.float32) for j, job in enumerate(live)}
        rows.sort(key=lambda r: len(r.tokens.ids))
        lengths = [len(r.tokens.ids) for r in rows]
        for start, stop in cut_batches(lengths, self.rule.fits, self.batch_cost_tokens):
            self._run_batch(rows[start:stop], outputs, failed)
            GUARD.after_batch()
        runnable = {r.job for r in rows}
        for j, job in enumerate(live):
            if j in runnable:
                settled.append((job, failed.get(j) or self._finish(job, outputs[j])))
        self._settle(settled)

    def _tokenize(self, jobs: list[Job]) -> tuple[list[_Row], list[tuple[Job, EmbedError]]]:
        """Rows to run, and the jobs refused for an input over max_length with truncate off."""
        encoded = self.encoder.encode([text for job in jobs for text in job.texts])
        rows, refused, offset = [], [], 0
        for j, job in enumerate(jobs):
            mine = encoded[offset : offset + len(job.texts)]
            offset += len(job.texts)
            too_long = [i for i, t in enumerate(mine) if t.truncated] if not job.truncate else []
            if too_long:
                refused.append((job, self._too_long(too_long[0])))
                continue
            job.tokens = [len(t.ids) for t in mine]
            rows += [_Row(j, i, t) for i, t in enumerate(mine)]
        return rows, refused

    def _too_long(self, index: int) -> InputTooLong:
        return InputTooLong(
            f"texts[{index}] is longer than {self.name}'s max_length of {self.encoder.max_length} tokens; "
            "shorten it, split it, or send truncate=true"
        )

    def _run_batch(self, batch: list[_Row], outputs: dict[int, np.ndarray], failed: dict[int, EmbedError]) -> None:
        padded = self.encoder.pad([r.tokens for r in batch])
        self.batches_run += 1
        try:
            with METER.measure() as reading:
                states = self.backend.run(padded)
            self._note_peak(reading, padded.ids.shape)
            vectors = pooling.pool(states, padded.mask, self.pooling)
        except Exception as exc:
            log.exception("model %s: a batch of %d texts failed", self.name, len(batch))
            for r in batch:
                failed[r.job] = InternalError(f"inference failed on {self.name}: {exc}")
            return
        for r, vector in zip(batch, vectors):
            outputs[r.job][r.index] = vector

    def _note_peak(self, reading: Reading, shape: tuple[int, ...]) -> None:
        """Keep the largest peak; one over the budget means the cost model is wrong: say so."""
        if reading.peak is None or reading.peak <= self.peak_seen:
            return
        self.peak_seen = reading.peak
        if self.peak_seen > self.work:
            log.warning(
                "model %s: a batch of %d x %d tokens took %.0f MiB of working memory, over its budget of %.0f MiB; "
                "its charge grows to match",
                self.name, shape[0], shape[1], self.peak_seen / MIB, self.work / MIB,
            )  # fmt: skip

    @staticmethod
    def _finish(job: Job, vectors: np.ndarray) -> Embedded:
        """Normalization and the Matryoshka cut, which re-normalizes what it keeps."""
        if job.dimensions is not None:
            vectors = vectors[:, : job.dimensions]
        if job.normalize:
            vectors = pooling.l2_normalize(vectors)
        return Embedded(np.ascontiguousarray(vectors), job.tokens)

    def _settle(self, settled: list[tuple[Job, Embedded | EmbedError]]) -> None:
        """Hand results to the event loop in one wake-up."""
        finished = time.monotonic()
        for job, _ in settled:
            job.finished = finished
        if settled:
            self.loop.call_soon_threadsafe(_settle_futures, settled)


def cut_batches(
    sorted_lengths: list[int], fits: Callable[[int, int], bool], batch_cost_tokens: int
) -> Iterator[tuple[int, int]]:
    """Slices of ascending token lengths for which ``fits(rows, longest)`` holds.

    A batch is also cut where padding its rows up to the next length would cost more compute
    than running one more batch (``batch_cost_tokens``): on a CPU, where work grows with every
    token, padding rarely pays; on a GPU a batch's fixed cost is large and padding is cheap.
    A single row that does not fit still forms a batch of its own (a model loads only if one
    text of max_length fits its working budget).
    """
    start = 0
    for stop, length in enumerate(sorted_lengths):
        rows = stop - start + 1  # this row is the longest so far: lengths ascend
        padding = (length - sorted_lengths[stop - 1]) * (rows - 1) if stop > start else 0
        if stop > start and (not fits(rows, length) or padding > batch_cost_tokens):
            yield start, stop
            start = stop
    if sorted_lengths:
        yield start, len(sorted_lengths)


def _settle_futures(settled: list[tuple[Job, Embedded | EmbedError]]) -> None:
    for job, outcome in settled:
        if job.future.done():
            continue
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
