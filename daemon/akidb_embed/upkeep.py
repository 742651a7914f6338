"""Background upkeep of the model cache: keep_alive expiry, memory-pressure eviction, warm start.

Runs on the event loop beside the server; the decisions come from ``cache`` and the unloads go
through the registry, so a request in flight is never cut short.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from akidb_embed_client.errors import EmbedError

from . import cache
from .registry import Registry

log = logging.getLogger(__name__)


class Upkeep:
    """Every few seconds: unload idle models past their keep_alive, evict under memory pressure."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._stuck = False  # under pressure with nothing to evict: said once, not every round

    async def run(self, every: float, after: Callable[[], None]) -> None:
        """Check every ``every`` seconds, then call ``after`` (the status report)."""
        while True:
            await asyncio.sleep(every)
            try:
                self.check()
                after()  # also catches loads and unloads that requests started
            except Exception:  # upkeep must outlive one bad round
                log.exception("memory upkeep failed")

    def check(self) -> None:
        self.expire_idle()
        self.relieve_pressure()

    def expire_idle(self) -> None:
        now = time.time()
        for entry in list(self.registry.entries.values()):
            model = entry.model
            if model and not entry.pinned and entry.loading is None and 0 <= model.keep_alive < model.idle_for(now):
                self.registry.unload(entry, f"idle for {model.idle_for(now):.0f} s, keep_alive {model.keep_alive:g} s")

    def relieve_pressure(self) -> None:
        registry, memory = self.registry, self.registry.settings.memory
        sample = registry.monitor.sample()
        if sample.pressure <= memory.high_watermark:
            self._stuck = False
            return
        victims = cache.evictions_for_pressure(registry.residents(), sample.used, sample.total, memory.low_watermark)
        for model_id in victims:
            registry.evictions += 1
            registry.unload(registry.entries[model_id], f"memory pressure {sample.pressure:.0%} over the high watermark")
        if not victims and not self._stuck:
            log.warning("memory pressure %.0f%% but no idle unpinned model to evict", sample.pressure * 100)
        self._stuck = not victims


async def warm_start(registry: Registry) -> None:
    """Reload pinned models, then those warm before the last stop, most recent first, as memory allows."""
    order = [e.id for e in registry.entries.values() if e.pinned] + registry.store.state.warm
    for model_id in dict.fromkeys(order):
        entry = registry.entries.get(model_id)
        if entry is None or entry.state != "available":
            continue
        try:
            await registry.load(entry)
        except EmbedError as exc:
            log.warning("model %s: not reloaded at start: %s", model_id, exc.message)
