"""What a model's batcher works on: a request's ``Job``, its result, and its texts while they wait.

A job's texts are scheduled one by one (``Row``s in the fair queue) while its ``Pending`` collects
their vectors in input order, so a job settles once, whole, when its last text has run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
from akidb_embed_client.errors import EmbedError

from .tokenize import Tokens


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
    owner: Hashable = None  # whose share of the model it runs in (tenancy.Caller.owner)
    weight: float = 1.0  # its owner's weight in the fair queue
    tokens: list[int] = field(default_factory=list)
    # time.monotonic() when it was queued, when its first text was taken, and done: its queue wait and inference time
    queued: float = 0.0
    started: float = 0.0
    finished: float = 0.0


@dataclass(eq=False)
class Pending:
    """A job whose texts are in the fair queue: its vectors so far and what is left."""

    job: Job
    dimension: int
    left: int  # rows not yet run
    outputs: np.ndarray | None = None  # allocated at its first vector: a queued job holds only its tokens
    error: EmbedError | None = None
    done: bool = False  # settled, or past caring: its remaining rows are dropped

    def put(self, index: int, vector: np.ndarray) -> None:
        if self.outputs is None:
            self.outputs = np.empty((len(self.job.texts), self.dimension), np.float32)
        self.outputs[index] = vector


@dataclass(frozen=True)
class Row:
    pending: Pending
    index: int
    tokens: Tokens
