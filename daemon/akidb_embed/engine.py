"""The embed path from a decoded request to vectors: validation, model, prompt, batcher.

``Engine.embed`` checks the request against the limits and the model's manifest, acquires the
model from the registry, queues one ``Job`` on its batcher and awaits it. ``models``,
``status`` and ``ping`` answer from the registry.
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
from .registry import Registry
from .settings import Settings


class Engine:
    """What each op does, given a registry of models."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.started = time.time()

    async def embed(self, fields: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
        """The embed reply header and the vectors for one request."""
        texts = self._checked_texts(fields["texts"])
        model = await self.registry.acquire(fields.get("model"))
        try:
            job = self._job(model.manifest, texts, fields)
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

    def models(self) -> dict[str, Any]:
        """The catalog: every manifest with its state."""
        return {"models": self.registry.describe(), "default": self.registry.default_id()}

    def status(self) -> dict[str, Any]:
        """Daemon-wide figures: uptime, models by state, queue depth."""
        described = self.registry.describe()
        states: dict[str, int] = {}
        for info in described:
            states[info["state"]] = states.get(info["state"], 0) + 1
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
        }

    def ping(self) -> dict[str, Any]:
        return {"pong": True, "version": __version__}

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

    def _job(self, manifest: Manifest, texts: list[str], fields: dict[str, Any]) -> Job:
        dimensions = fields.get("dimensions")
        allowed = sorted({*manifest.matryoshka_dimensions, manifest.dimension})
        if dimensions is not None and dimensions not in allowed:
            raise BadRequest(f"model {manifest.id} cannot give {dimensions} dimensions; allowed: {', '.join(map(str, allowed))}")
        prompt = fields.get("prompt")
        if prompt is not None and not prompt:
            raise BadRequest("prompt is empty; leave it out or name a prompt")
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
            deadline=time.monotonic() + timeout_ms / 1e3 if timeout_ms else float("inf"),
        )
