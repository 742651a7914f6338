"""What each op does, from a decoded request to its reply: ``(header, vectors or None)``.

``embed`` checks the request against the limits and the model's manifest, acquires the model
from the registry, queues one ``Job`` on its batcher and awaits it. ``load``/``pin`` await a
load and ``unload`` the release of the memory; ``unpin``, ``models``, ``status`` and ``ping``
answer at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np
from akidb_embed_client.errors import BadRequest
from akidb_embed_client.protocol import is_utf8

from . import __version__
from .batcher import Embedded, Job
from .manifest import Manifest
from .memory import MIB
from .registry import Entry, Registry, default_keep_alive
from .settings import Settings

Outcome = tuple[dict[str, Any], "np.ndarray | None"]


class Engine:
    """What each op does, given a registry of models."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.started = time.time()

    async def embed(self, fields: dict[str, Any]) -> Outcome:
        """The embed reply header and the vectors for one request."""
        arrived = time.monotonic()  # timeout_ms counts from here, a cold load included
        texts = self._checked_texts(fields["texts"])
        entry = self.registry.entry(fields.get("model"))
        if entry.model is None:
            self._job(entry.manifest, texts, fields, arrived)  # a bad request fails before it can cause a load
        model = await self.registry.acquire(entry.id, fields.get("keep_alive"))
        try:
            job = self._job(model.manifest, texts, fields, arrived)
            model.batcher.submit(job)
            embedded: Embedded = await job.future
        finally:
            self.registry.release(model, served=len(texts))
        header = {
            "model": model.manifest.id,
            "fingerprint": model.fingerprint,
            "dim": embedded.vectors.shape[1],
            "tokens": embedded.tokens,
        }
        return header, embedded.vectors

    async def load(self, fields: dict[str, Any]) -> Outcome:
        """Load a model now (and keep it for ``keep_alive`` seconds)."""
        entry = self.registry.entry(fields["model"])
        await self.registry.load(entry)
        if fields.get("keep_alive") is not None and entry.model is not None:
            entry.model.keep_alive = fields["keep_alive"]
        return {"model": self.describe(entry)}, None

    async def unload(self, fields: dict[str, Any]) -> Outcome:
        """Unload a model; replies once its memory is released (or, in use, once it is retired)."""
        entry = self.registry.entry(fields["model"])
        closing = self.registry.unload(entry)
        if closing is not None:
            await closing
        return {"model": self.describe(entry)}, None

    async def pin(self, fields: dict[str, Any]) -> Outcome:
        """Keep a model loaded: never evicted, reloaded at start."""
        entry = self.registry.entry(fields["model"])
        self.registry.pin(entry, True)
        await self.registry.load(entry)
        return {"model": self.describe(entry)}, None

    async def tune(self, fields: dict[str, Any]) -> Outcome:
        """Measure a model's footprint and speed settings again and serve it with them."""
        entry = self.registry.entry(fields["model"])
        await self.registry.retune(entry)
        return {"model": self.describe(entry)}, None

    def unpin(self, fields: dict[str, Any]) -> Outcome:
        entry = self.registry.entry(fields["model"])
        self.registry.pin(entry, False)
        return {"model": self.describe(entry)}, None

    def models(self, fields: dict[str, Any]) -> Outcome:
        """The catalog: every manifest with its state."""
        return {"models": [self.describe(entry) for entry in self.registry.entries.values()], "default": self.registry.default_id()}, None

    def status(self, fields: dict[str, Any]) -> Outcome:
        """Daemon-wide figures: uptime, models by state, queues, memory and the budget."""
        described = [self.describe(entry) for entry in self.registry.entries.values()]
        states: dict[str, int] = {}
        for info in described:
            states[info["state"]] = states.get(info["state"], 0) + 1
        memory = self.settings.memory
        loaded = [info for info in described if info["state"] == "ready"]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "socket": str(self.settings.socket),
            "catalog": str(self.settings.catalog),
            "default_model": self.registry.default_id(),
            "models": states,
            "queued_texts": sum(info.get("queued_texts", 0) for info in described),
            "in_flight": sum(info.get("in_flight", 0) for info in described),
            "memory": self.registry.monitor.sample().as_dict(),
            "budget": {
                "model_memory_mb": memory.model_memory_mb,
                "max_loaded_models": memory.max_loaded_models,
                "loaded_models": len(loaded),
                "loaded_memory_mb": round(float(sum(info["memory_mb"] for info in loaded)), 1),
                "unaccounted_mb": _mb(self.registry.unaccounted),
                "high_watermark": memory.high_watermark,
                "low_watermark": memory.low_watermark,
            },
            "evictions": self.registry.evictions,
        }, None

    def ping(self, fields: dict[str, Any]) -> Outcome:
        return {"pong": True, "version": __version__}, None

    def describe(self, entry: Entry) -> dict[str, Any]:
        """One catalog entry as the ``models`` reply lists it."""
        serving = entry.model.manifest if entry.model else entry.manifest
        info = serving.describe() if serving else {"id": entry.id}
        estimate, source = self.registry.estimate(entry.id, serving) if serving else (0, "unknown")
        info.update(
            state=entry.state, error=entry.error, update_error=entry.update_error, path=str(entry.path),
            default=entry.id == self.registry.default_id(),
            pinned=entry.pinned, memory_mb=round(estimate / MIB, 1), memory_source=source,
            keep_alive=default_keep_alive(serving, self.settings) if serving else None,
            last_used=self.registry.store.recorded(entry.id).last_used or None,
            verification="pending" if serving and serving.golden else "unverified", selftest=None,
        )  # fmt: skip
        model = entry.model
        if model is not None:
            info.update(
                fingerprint=model.fingerprint, provider=model.backend.providers[0], loaded_at=model.loaded_at,
                last_used=model.last_used, in_flight=model.in_flight, requests=model.requests, served=model.served,
                load_ms=round(model.load_seconds * 1e3, 1), queued_texts=model.batcher.queued_texts,
                batches=model.batcher.batches_run, keep_alive=model.keep_alive,
                memory_mb=round(self.registry.footprint(entry) / MIB, 1), memory_source="measured",
                weights_mb=_mb(model.footprint.weights), work_mb=_mb(model.footprint.work), peak_mb=_mb(model.peak),
                threads=model.footprint.tuning.threads, run_cost_tokens=model.footprint.tuning.run_cost_tokens,
                batch_tokens=model.batcher.rule.max_tokens,
                verification="passed" if model.selftest else "unverified",
                selftest=model.selftest.as_dict() if model.selftest else None,
            )  # fmt: skip
        return info

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

    def _job(self, manifest: Manifest, texts: list[str], fields: dict[str, Any], arrived: float) -> Job:
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
        )


def _mb(count: int) -> float:
    return round(count / MIB, 1)
