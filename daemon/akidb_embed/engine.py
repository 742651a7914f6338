"""What each op does, from a decoded request to its reply: ``(header, vectors or None)``.

``embed`` checks the request against the limits and the model's manifest, acquires the model
from the registry, queues one ``Job`` on its batcher, awaits it and counts it in the model's
statistics. ``load``/``pin`` await a load, ``tune`` a measured reload, ``bench`` a measured
profile and ``unload`` the release of the memory; ``unpin``, ``models``, ``status`` and
``ping`` answer at once, from the registry's snapshot. ``ops`` is the table the server
dispatches through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from akidb_embed_client.errors import (BadRequest, EmbedError, InsufficientMemory, InternalError, ModelChanged,
                                      ModelUnavailable, Overloaded)
from akidb_embed_client.protocol import AUTO_MODEL, is_utf8

from . import __version__, report, routing
from .backpressure import ReplyGate
from .batcher import Embedded, Job
from .catalog import Entry
from .loader import LoadedModel
from .manifest import Manifest
from .profile import LATENCY_TEXTS
from .registry import Registry
from .settings import Settings
from .stats import Timing
from .tenancy import Caller, Tenants, visible

Outcome = tuple[dict[str, Any], "np.ndarray | None"]
Op = Callable[[dict[str, Any], Caller], "Outcome | Coroutine[Any, Any, Outcome]"]
MAX_BENCH_TEXTS = 1000


class Engine:
    """What each op does, given a registry of models."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.tenants = Tenants(settings)
        self.started = time.time()
        self.replies = ReplyGate()  # the server's replies, dropped and muted, for status

    def ops(self) -> dict[str, Op]:
        """Each op of the protocol and what answers it, given the caller: a coroutine for those that wait (counted
        in the caller's tenant's requests in flight, after its permission is checked), else a function."""
        waiting = {"embed": self.embed, "load": self.load, "unload": self.unload, "pin": self.pin, "tune": self.tune,
                   "bench": self.bench}  # fmt: skip
        return {
            **{op: self._admitted(op, handler) for op, handler in waiting.items()},
            "unpin": self._admitted("unpin", self.unpin), "models": self.models, "status": self.status, "ping": self.ping,
        }  # fmt: skip

    def _admitted(self, op: str, handler: Op) -> Op:
        """``handler`` for callers whose tenant may use ``op``, counted against its max_in_flight if it waits."""
        def admitted(fields: dict[str, Any], caller: Caller) -> Outcome | Coroutine[Any, Any, Outcome]:
            self.tenants.check_op(caller, op)
            outcome = handler(fields, caller)
            return self.tenants.waiting(caller, outcome) if asyncio.iscoroutine(outcome) else outcome
        return admitted

    async def embed(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """The embed reply header and the vectors for one request, counted in the caller's tenant's figures."""
        try:
            header, vectors = await self._embed(fields, caller)
        except Exception as exc:
            self.tenants.answered(caller, exc.code if isinstance(exc, EmbedError) else InternalError.code, 0)
            raise
        self.tenants.answered(caller, "ok", len(vectors))
        return header, vectors

    async def _embed(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        arrived = time.monotonic()  # timeout_ms counts from here, a cold load included
        texts = self._checked_texts(fields["texts"])
        fields, choice = self._routed(fields, caller)
        entry = self._entry(caller, fields.get("model"))
        with self.tenants.queued(caller, len(texts)):
            try:
                model, job = await self._counted(entry, texts, fields, arrived, caller)
                fallback = None
            except (ModelUnavailable, InsufficientMemory, Overloaded) as exc:
                if not (fields.get("allow_fallback") or choice):  # a fallback serves only by consent
                    raise
                model, job = await self._fall_back(entry, exc, texts, fields, arrived, caller)
                fallback = {"requested": entry.id, "reason": exc.code, "message": exc.message}
        embedded: Embedded = job.future.result()
        header = {
            "model": model.manifest.id,
            "fingerprint": model.fingerprint,
            "dim": embedded.vectors.shape[1],
            "tokens": embedded.tokens,
        }
        if choice is not None:
            header["auto"] = choice.describe()
        if fallback is not None:
            header["fallback"] = fallback
        return header, embedded.vectors

    def _entry(self, caller: Caller, model_id: str | None) -> Entry:
        """The registry's entry for a model the caller's tenant may use (None: the default model)."""
        chosen = model_id if model_id is not None else self.registry.default_id()
        if chosen is not None:
            self.tenants.check_model(caller, chosen, self.registry.entries, named=model_id is not None)
        return self.registry.entry(chosen)

    def _routed(self, fields: dict[str, Any], caller: Caller) -> tuple[dict[str, Any], routing.Choice | None]:
        """The request with the model ``auto`` chose (and the task's prompt, the Matryoshka dimensions), and the
        choice; a request naming its model unchanged."""
        constraints = fields.get("constraints")
        if fields.get("model") != AUTO_MODEL:
            if constraints is not None:
                raise BadRequest(f'constraints choose a model: send them with model "{AUTO_MODEL}", or leave them out')
            return fields, None
        choice = routing.choose(self._candidates(caller), routing.parse_constraints(constraints or {}))
        routed = {**fields, "model": choice.model}
        if choice.prompt is not None and fields.get("prompt") is None:
            routed["prompt"] = choice.prompt
        if choice.dimensions is not None and fields.get("dimensions") is None:
            routed["dimensions"] = choice.dimensions
        return routed, choice

    def _candidates(self, caller: Caller) -> list[routing.Candidate]:
        return visible(caller.tenant, self.registry.candidates(), lambda candidate: candidate.id)

    async def _fall_back(
        self, entry: Entry, error: EmbedError, texts: list[str], fields: dict[str, Any], arrived: float, caller: Caller
    ) -> tuple[LoadedModel, Job]:
        """Serve with the first of the entry's fallbacks the caller may use that can and gives the same vector width;
        else ``error``."""
        wanted = fields.get("dimensions")
        for other_id in visible(caller.tenant, entry.manifest.fallback):
            other = self.registry.entries.get(other_id)
            if other is None or other.manifest is None or not other.manifest.enabled:
                continue
            if not _same_width(entry.manifest, other.manifest, wanted):
                continue  # never across dimensions: the app's index holds vectors of one width
            try:
                return await self._counted(other, texts, fields, arrived, caller)
            except (ModelUnavailable, InsufficientMemory, Overloaded):
                continue
        raise error

    async def _counted(
        self, entry: Entry, texts: list[str], fields: dict[str, Any], arrived: float, caller: Caller
    ) -> tuple[LoadedModel, Job]:
        """``_run``, counted in the entry's statistics."""
        try:
            model, job = await self._run(entry, texts, fields, arrived, caller)
        except Exception as exc:
            entry.stats.failed(exc.code if isinstance(exc, EmbedError) else InternalError.code)
            raise
        entry.stats.served(len(texts), Timing(job.started - job.queued, job.finished - job.started, time.monotonic() - arrived))
        return model, job

    async def _run(
        self, entry: Entry, texts: list[str], fields: dict[str, Any], arrived: float, caller: Caller
    ) -> tuple[LoadedModel, Job]:
        """The model that served the request and its finished job."""
        # Checked before the model is taken: a bad request neither causes a load nor sets keep_alive.
        serving = entry.model.manifest if entry.model else entry.manifest
        job = self._job(serving, texts, fields, arrived, caller)
        if entry.model is not None:  # an open circuit refuses at once; an unloaded model's load is admitted by its load
            entry.circuit.admit()
        entry.stats.took(loaded=entry.model is not None)
        model = await self.registry.acquire(entry.id, fields.get("keep_alive"))
        try:
            _check_fingerprint(model, fields.get("expect_fingerprint"))
            if model.manifest is not serving:  # loaded, or swapped, meanwhile: the version that serves decides
                job = self._job(model.manifest, texts, fields, arrived, caller)
            model.submit(job)
            await job.future
        finally:
            self.registry.release(model, served=len(texts))
            entry.circuit.ran(job.future)
        return model, job

    async def load(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """Load a model now (and keep it for ``keep_alive`` seconds)."""
        entry = self._entry(caller, fields["model"])
        entry.circuit.reset("a load was asked for")
        await self.registry.load(entry)
        if fields.get("keep_alive") is not None and entry.model is not None:
            entry.model.keep_alive = fields["keep_alive"]
        return {"model": self.registry.describe(entry.id)}, None

    async def unload(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """Unload a model; replies once its memory is released (or, in use, once it is retired)."""
        entry = self._entry(caller, fields["model"])
        closing = self.registry.unload(entry)
        if closing is not None:
            await closing
        return {"model": self.registry.describe(entry.id)}, None

    async def pin(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """Keep a model loaded: never evicted, reloaded at start."""
        entry = self._entry(caller, fields["model"])
        self.registry.pin(entry, True)
        await self.registry.load(entry)
        return {"model": self.registry.describe(entry.id)}, None

    async def tune(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """Measure a model's footprint and speed settings again and serve it with them."""
        entry = self._entry(caller, fields["model"])
        await self.registry.retune(entry)
        return {"model": self.registry.describe(entry.id)}, None

    async def bench(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """Measure a model's profile on this device through its own queue, and keep it."""
        entry = self._entry(caller, fields["model"])
        texts = fields.get("texts")
        if texts is not None and not 1 <= texts <= MAX_BENCH_TEXTS:
            raise BadRequest(f"texts must be 1 to {MAX_BENCH_TEXTS} (single-text requests to time), not {texts}")
        measured = await self.registry.bench(entry, texts or LATENCY_TEXTS)
        return {"model": self.registry.describe(entry.id), "profile": measured.as_dict()}, None

    def unpin(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        entry = self._entry(caller, fields["model"])
        self.registry.pin(entry, False)
        return {"model": self.registry.describe(entry.id)}, None

    def models(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """The catalog as the caller's tenant sees it: each of its manifests with its state, and the tenant's
        figures; with ``constraints``, also the models that meet them, best first (the first is what ``auto``
        would choose now), and why each other one does not."""
        seen = self._seen(caller)
        reply = {"models": seen.models, "default": seen.default, "tenants": self.tenants.figures(caller)}
        if fields.get("constraints") is not None:
            fitting, rejected = routing.rank(self._candidates(caller), routing.parse_constraints(fields["constraints"]))
            reply["fits"] = {"fitting": [{"id": c.model, **c.describe()} for c in fitting], "rejected": rejected}
        return reply, None

    def _seen(self, caller: Caller) -> report.Seen:
        return report.seen(self.registry.snapshot(), caller.tenant)

    def status(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        """Daemon-wide figures as the caller's tenant sees them (``report.reply``)."""
        reply = report.reply(self.settings, self.started, self._seen(caller), caller.tenant, self.tenants.figures(caller))
        return {**reply, **self.replies.describe()}, None

    def ping(self, fields: dict[str, Any], caller: Caller) -> Outcome:
        return {"pong": True, "version": __version__}, None

    def _checked_texts(self, texts: list[Any]) -> list[str]:
        limit = self.settings.limits.max_texts
        if not texts:
            raise BadRequest("texts is empty; send at least one text")
        if len(texts) > limit:
            raise BadRequest(f"{len(texts)} texts in one request; the limit is {limit} (limits.max_texts): split it")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadRequest(f"texts[{i}] is a {type(text).__name__}; every text must be a string")
            if not is_utf8(text):
                raise BadRequest(f"texts[{i}] is not valid UTF-8; send UTF-8 text")
        return texts

    def _job(self, manifest: Manifest, texts: list[str], fields: dict[str, Any], arrived: float, caller: Caller) -> Job:
        dimensions = fields.get("dimensions")
        allowed = sorted({*manifest.matryoshka_dimensions, manifest.dimension})
        if dimensions is not None and dimensions not in allowed:
            raise BadRequest(f"model {manifest.id} cannot give {dimensions} dimensions; allowed: {', '.join(map(str, allowed))}")
        prompt = fields.get("prompt")
        if prompt is not None and not prompt:
            raise BadRequest("prompt is empty; leave it out or name a prompt")
        if prompt is not None and not is_utf8(prompt):
            raise BadRequest("prompt is not valid UTF-8; send UTF-8 text")
        prefix = manifest.resolve_prompt(prompt)
        timeout_ms = fields.get("timeout_ms")
        if timeout_ms is not None and timeout_ms <= 0:
            raise BadRequest(f"timeout_ms must be positive, not {timeout_ms}")
        return Job(
            texts=[prefix + text for text in texts] if prefix else texts,
            future=asyncio.get_running_loop().create_future(),
            truncate=fields.get("truncate") is not False,
            normalize=manifest.normalize if fields.get("normalize") is None else fields["normalize"],
            dimensions=dimensions,
            deadline=arrived + timeout_ms / 1e3 if timeout_ms else float("inf"),
            owner=caller.owner,
            weight=caller.tenant.weight,
        )



def _check_fingerprint(model: LoadedModel, expected: str | None) -> None:
    """ModelChanged if the model serving is not the version the request's vectors must match."""
    if expected is not None and model.fingerprint != expected:
        raise ModelChanged(
            f"model {model.manifest.id!r} now serves fingerprint {model.fingerprint}, not {expected}: its vectors "
            "would not mix with those you have; re-embed your index with it, or drop expect_fingerprint",
            expected_fingerprint=expected, fingerprint=model.fingerprint, model=model.manifest.id,
        )  # fmt: skip


def _same_width(requested: Manifest, fallback: Manifest, dimensions: int | None) -> bool:
    """Whether the fallback gives vectors as wide as the requested model would: the same dimension, or the
    dimensions asked for, which both support."""
    if dimensions is None:
        return fallback.dimension == requested.dimension
    return all(dimensions in (m.dimension, *m.matryoshka_dimensions) for m in (requested, fallback))
