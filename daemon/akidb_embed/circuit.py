"""Each model's circuit breaker: a model that keeps failing is left alone for a while, then tried once.

A failed load opens the circuit at once; failed inferences open it after ``failures`` in a row.
While it is open, requests get ``model_unavailable`` with ``retry_after_ms`` at once, and the
model is neither loaded nor run. Once the backoff has passed, one caller goes through as the
trial (half-open) while the others are still refused: its success closes the circuit, its
failure opens it again for twice the backoff (up to ``max_backoff_seconds``). A new version of
the model, or an explicit ``load``, resets it. Used on the event-loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from akidb_embed_client.errors import InternalError, ModelUnavailable

from .settings import CircuitSettings

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# What callers refused while the trial runs are told: its outcome is near, unlike the next backoff.
TRIAL_RETRY_MS = 1000

Publish = Callable[..., None]  # publish(event, **fields): the model's lifecycle events


class Circuit:
    """One model's breaker: closed, open (until its backoff passes) or half-open (one trial running)."""

    def __init__(self, name: str, settings: CircuitSettings, publish: Publish,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.name = name
        self.settings = settings
        self.publish = publish
        self.clock = clock
        self.state = CLOSED
        self.failures = 0  # in a row
        self.last_error: str | None = None  # the latest failure, kept once the circuit closes
        self.opened_at = 0.0
        self.backoff = 0.0  # seconds open before the next trial; 0 while closed

    def admit(self) -> None:
        """Let a caller through, as the trial if the backoff has just passed; else raise ModelUnavailable."""
        if self.state == CLOSED:
            return
        now = self.clock()
        if self.state == OPEN and now >= self.opened_at + self.backoff:
            self.state = HALF_OPEN
            log.info("model %s: circuit half-open: one trial after %.1f s", self.name, self.backoff)
            return
        retry_ms = max(1, self._remaining_ms(now))
        raise ModelUnavailable(
            f"model {self.name!r} is unavailable: {self.last_error}; its circuit is open: tried again in "
            f"{retry_ms / 1e3:.1f} s, or at once after a new manifest or model file or a load",
            retry_after_ms=retry_ms,
        )

    def succeeded(self) -> None:
        """A load or an inference worked: the circuit closes."""
        self.failures = 0
        if self.state != CLOSED:
            self._close("the model served again")

    def failed(self, error: str, at_once: bool = False) -> None:
        """A load (``at_once``) or an inference failed: open after enough in a row; a failed trial backs off further."""
        self.failures += 1
        self.last_error = error
        if self.state == HALF_OPEN:
            self._open(min(self.backoff * 2, self.settings.max_backoff_seconds))
        elif self.state == CLOSED and (at_once or self.failures >= self.settings.failures):
            self._open(self.settings.backoff_seconds)
        # Open already: a request let in before it opened; the backoff runs on.

    def abandoned(self) -> None:
        """A trial ended proving nothing (the caller's own error, no room to load): the next caller is the trial."""
        if self.state == HALF_OPEN:
            self.state = OPEN  # with its backoff passed

    def ran(self, request: asyncio.Future) -> None:
        """Count an embed request's end: an inference failure (InternalError) toward opening, success closing;
        the caller's own errors (bad input, overloaded, timeouts, shutdown) prove nothing either way."""
        error = request.exception() if request.done() and not request.cancelled() else asyncio.CancelledError()
        if error is None:
            self.succeeded()
        elif isinstance(error, InternalError):
            self.failed(error.message)
        else:
            self.abandoned()

    def reset(self, reason: str) -> None:
        """Close at once, forgetting the failures in a row: a new version, or an operator's load."""
        self.failures = 0
        if self.state != CLOSED:
            self._close(reason)

    def retry_after_ms(self) -> int | None:
        """Milliseconds until the next trial (0: the next caller is it); None while closed."""
        return None if self.state == CLOSED else max(0, self._remaining_ms(self.clock()))

    def describe(self) -> dict[str, Any]:
        """The circuit as ``models`` lists it."""
        return {"state": self.state, "failures": self.failures, "retry_after_ms": self.retry_after_ms(),
                "last_error": self.last_error}  # fmt: skip

    def _remaining_ms(self, now: float) -> int:
        if self.state == HALF_OPEN:
            return TRIAL_RETRY_MS
        return math.ceil((self.opened_at + self.backoff - now) * 1e3)

    def _open(self, backoff: float) -> None:
        self.state, self.opened_at, self.backoff = OPEN, self.clock(), backoff
        log.warning("model %s: circuit open for %.1f s after %d failure(s) in a row: %s",
                    self.name, backoff, self.failures, self.last_error)  # fmt: skip
        self.publish("circuit_opened", error=self.last_error, retry_after_ms=math.ceil(backoff * 1e3))

    def _close(self, reason: str) -> None:
        self.state, self.backoff = CLOSED, 0.0
        log.info("model %s: circuit closed: %s", self.name, reason)
        self.publish("circuit_closed", reason=reason)
