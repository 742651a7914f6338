"""Per-model queue and batching: the one thread that runs a model's ONNX session.

Requests from any number of clients queue here as ``Job``s. The worker thread tokenizes each new
job and queues its texts, shortest first, under the job's owner (tenant and client) in a
weighted fair queue (``fairqueue``), so one client's single query never waits behind all of
another's 256-text request. Each round takes texts in fair order: up to ``max_batch`` of them
while one owner has the model to itself; while more than one owner was served in the last
``CONTENDED_SECONDS`` or is waiting, and one of them has more than a slice waiting (a bulk stream,
not many clients of single queries), only as many as make one batch within the fair slice
(``slice_tokens`` padded tokens, ``FAIR_SLICE_RUNS`` runs' fixed cost), which bounds how long a
newcomer waits for the round under way. A round's texts are sorted by length and cut into
batches whose padded size stays within the token budget, whose working memory (``workmem`` cost
model: long texts get fewer rows) stays within the model's budget, and where padding costs less
than another run. Each job gets its vectors, in input order, on the event loop once its last
text ran. A failing batch fails only the jobs that had texts in it; the thread logs and carries
on. Each batch that runs alone in the process has its peak measured; a second after the last
one, the freed heap goes back to the system.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator

import numpy as np
from akidb_embed_client.errors import EmbedError, InputTooLong, InternalError, Overloaded, ShuttingDown

from . import pooling
from .backend import Backend
from .fairqueue import FairQueue
from .footprint import Footprint
from .jobs import Embedded, Job, Pending, Row
from .memory import MIB, trim_heap
from .settings import Limits
from .tokenize import TextEncoder
from .workmem import GUARD, METER, BatchRule, Reading

log = logging.getLogger(__name__)

# A model idle this long hands its batches' memory back. Not after every batch: the next request
# of a burst would fault all of it in again.
IDLE_TRIM_SECONDS = 1.0
# While owners contend, a batch costs at most this many runs' fixed cost (tuning.run_cost_tokens) in padded
# tokens, so the fixed cost stays about a ninth of the work; and at least FAIR_SLICE_MIN_TOKENS, for the
# per-batch work outside the run (padding, pooling, hand-back) and a run cost measured as 0 on a busy machine.
FAIR_SLICE_RUNS = 8
FAIR_SLICE_MIN_TOKENS = 96
# Measured (MiniLM, 2 cores, bench --sections fairness): 20 runs / 256 tokens kept 0.95x of the bulk rate but
# let a single query wait 7x its idle p95 (it rides in a whole slice); 8 / 96: 1.9-2.3x and 0.94x.
CONTENDED_SECONDS = 1.0  # owners served this recently count as contending


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
        self.slice_tokens = min(self.rule.max_tokens, max(FAIR_SLICE_MIN_TOKENS, FAIR_SLICE_RUNS * tuning.run_cost_tokens))
        self.encoder = encoder
        self.backend = backend
        self.pooling = pooling_mode
        self.limits = limits
        self.work = footprint.work
        self.peak_seen = 0  # bytes: the largest batch measured running alone
        self.loop = loop
        self._inbox: deque[Job] = deque()  # submitted, not yet tokenized
        self._fair: FairQueue[Row] = FairQueue()  # the worker's own
        self._last_served: dict[Hashable, float] = {}  # owner -> time.monotonic() its texts last ran (worker's own)
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
            self._inbox.append(job)
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
        while (jobs := self._collect(IDLE_TRIM_SECONDS if used_memory else None)) is not None:
            if not jobs and not self._fair:  # idle for a while after work: its memory goes back to the system
                trim_heap()
                used_memory = False
                continue
            running: list[Job] = []  # the jobs with texts in this round's batch
            try:
                self._enqueue(jobs)
                self._serve(self._next_batch(running))
            except Exception as exc:  # the thread must outlive any one bad batch
                log.exception("model %s: batch failed", self.name)
                failed = running or jobs  # the batch's jobs; with none yet, tokenizing the new ones failed
                self._settle([(job, InternalError(f"inference failed on {self.name}: {exc}")) for job in failed])
            used_memory = True

    def _collect(self, idle_timeout: float | None) -> list[Job] | None:
        """The jobs submitted since the last call; blocks only while nothing at all is queued.

        None once closed with nothing left; an empty list when ``idle_timeout`` seconds pass without work.
        """
        with self._wakeup:
            while not self._inbox and not self._fair and not self._closed:
                if not self._wakeup.wait(idle_timeout):
                    return []
            if not self._inbox and not self._fair:
                return None
            jobs = list(self._inbox)
            self._inbox.clear()
        return jobs

    def _enqueue(self, jobs: list[Job]) -> None:
        """Tokenize new jobs and queue their rows, shortest first, under their owners; settle those refused."""
        refused = []
        live = [job for job in jobs if not job.future.done()]  # a done one was answered already (shutdown)
        self._dequeued(sum(len(job.texts) for job in jobs) - sum(len(job.texts) for job in live))
        encoded = self.encoder.encode([text for job in live for text in job.texts])  # one call for all new jobs
        offset = 0
        for job in live:
            mine = encoded[offset : offset + len(job.texts)]
            offset += len(job.texts)
            too_long = [i for i, t in enumerate(mine) if t.truncated] if not job.truncate else []
            if too_long:
                refused.append((job, self._too_long(too_long[0])))
                self._dequeued(len(job.texts))
                continue
            job.tokens = [len(t.ids) for t in mine]
            pending = Pending(job, self.dimension, len(job.texts))
            rows = sorted((Row(pending, i, t) for i, t in enumerate(mine)), key=lambda r: len(r.tokens.ids))
            self._fair.add(job.owner, job.weight, [(len(r.tokens.ids), r) for r in rows])
        self._settle(refused)

    def _dequeued(self, texts: int) -> None:
        with self._wakeup:
            self._queued_texts -= texts

    def _next_batch(self, running: list[Job]) -> list[Row]:
        """The rows to run next, in fair order: up to max_batch; while owners contend, one slice's batch."""
        now = time.monotonic()
        recent = {owner for owner, t in self._last_served.items() if now - t < CONTENDED_SECONDS}
        # Cutting batches pays only when someone has more than a slice waiting: owners with a
        # few texts each (many clients of single queries) all ride in one full batch.
        contended = len(recent | self._fair.owners()) > 1 and self._fair.largest_backlog() > self.slice_tokens
        rows, longest = 0, 0

        def accept(row: Row) -> bool:
            nonlocal rows, longest
            if row.pending.done:
                return True  # dropped below, free
            wider = max(longest, len(row.tokens.ids))
            if contended:
                fits = self.rule.fits(rows + 1, wider) and (rows + 1) * wider <= self.slice_tokens
            else:
                fits = rows < self.limits.max_batch
            if rows and not fits:
                return False
            rows, longest = rows + 1, wider
            return True

        taken = self._fair.take(accept)
        self._dequeued(len(taken))
        settled, live = [], []
        for row in taken:
            job = row.pending.job
            if not row.pending.done and (job.future.done() or job.deadline < now):
                row.pending.done = True  # cancelled at shutdown, or its client gave up (and may have resent it)
                settled.append((job, Overloaded(f"the request waited past its timeout_ms for {self.name}; retry")))
            if not row.pending.done:
                job.started = job.started or now
                self._last_served[job.owner] = now
                running.append(job)
                live.append(row)
        self._settle(settled)
        self._last_served = {owner: self._last_served[owner] for owner in recent | {r.pending.job.owner for r in live}}
        return live

    def _serve(self, batch: list[Row]) -> None:
        """Run the rows, sorted by length and cut by the rule and the padding, and settle each job whose last
        row ran."""
        batch.sort(key=lambda r: len(r.tokens.ids))
        lengths = [len(r.tokens.ids) for r in batch]
        for start, stop in cut_batches(lengths, self.rule.fits, self.batch_cost_tokens):
            self._run_batch(batch[start:stop])
            GUARD.after_batch()
        settled: list[tuple[Job, Embedded | EmbedError]] = []
        for row in batch:
            pending = row.pending
            pending.left -= 1
            if pending.done or (pending.left and pending.error is None):
                continue
            pending.done = True
            settled.append((pending.job, pending.error or self._finish(pending.job, pending.outputs)))
        self._settle(settled)

    def _too_long(self, index: int) -> InputTooLong:
        return InputTooLong(
            f"texts[{index}] is longer than {self.name}'s max_length of {self.encoder.max_length} tokens; "
            "shorten it, split it, or send truncate=true"
        )

    def _run_batch(self, batch: list[Row]) -> None:
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
                r.pending.error = InternalError(f"inference failed on {self.name}: {exc}")
            return
        for r, vector in zip(batch, vectors):
            r.pending.put(r.index, vector)

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
