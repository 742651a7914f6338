"""Background upkeep of the model cache: keep_alive expiry, memory-pressure eviction, warm start.

Runs on the event loop beside the server; the decisions come from ``cache`` and the unloads go
through the registry, so a request in flight is never cut short. Pressure includes the daemon's
own growth: resident memory beyond the idle daemon plus its models' charges is logged, with the
models that ran, and evicts idle models from under the memory cap like any other pressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from akidb_embed_client.errors import EmbedError

from . import cache
from .memory import MIB, process_rss, trim_heap
from .registry import Registry

log = logging.getLogger(__name__)
GROWTH_SLACK = 0.10  # own growth up to this share of the charges (or the floor) is allocator noise
GROWTH_FLOOR = 32 << 20


class Upkeep:
    """Every few seconds: unload idle models past their keep_alive, evict under memory pressure."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._stuck = False  # under pressure with nothing to evict: said once, not every round
        self._pressed = False  # over the high watermark, and not yet back under the low one
        self._batches: dict[str, int] = {}  # batches run per model at the last check

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
        self.measure_growth()
        self.relieve_pressure()
        self.registry.store.retry()  # a state write that failed (full disk) is tried again until it works

    def measure_growth(self) -> None:
        """Set ``ledger.unaccounted`` to what the daemon holds beyond its models' charges."""
        registry, ledger = self.registry, self.registry.ledger
        if any(e.loading is not None for e in registry.entries.values()):
            return  # a load's memory is in no charge until it is done: judge the next round
        loaded = {e.id: e for e in registry.entries.values() if e.model is not None}
        charges = ledger.book_charges()  # peaks seen serving may have raised them
        batches = {model_id: e.model.batches_run for model_id, e in loaded.items()}
        active = sorted(m for m, e in loaded.items() if e.model.in_flight or batches[m] != self._batches.get(m))
        self._batches = batches
        slack = max(GROWTH_FLOOR, GROWTH_SLACK * charges)
        excess = process_rss() - ledger.idle_rss - charges
        if excess > slack:
            trim_heap()  # freed but kept by the allocator is not growth
            excess = process_rss() - ledger.idle_rss - charges
        grown = excess > slack
        if grown and excess > 2 * ledger.unaccounted:  # said when it appears or doubles, not every round
            log.warning(
                "the daemon holds %.0f MiB beyond its models' charges of %.0f MiB (models that ran since the last "
                "check or serving now: %s); counted as memory pressure", excess / MIB, charges / MIB, ", ".join(active) or "none",
            )  # fmt: skip
        ledger.unaccounted = max(0, excess) if grown else 0

    def expire_idle(self) -> None:
        now = time.time()
        for entry in list(self.registry.entries.values()):
            model = entry.model
            if model and not entry.pinned and entry.loading is None and 0 <= model.keep_alive < model.idle_for(now):
                self.registry.unload(entry, f"idle for {model.idle_for(now):.0f} s, keep_alive {model.keep_alive:g} s")

    def relieve_pressure(self) -> None:
        registry, memory = self.registry, self.registry.settings.memory
        sample = registry.ledger.memory_sample()
        self._tell_pressure(sample.pressure, sample.source)
        residents = registry.ledger.residents()
        cap, charged = memory.model_memory_mb * MIB, sum(r.footprint for r in residents) + registry.ledger.unaccounted
        if cap and charged > cap:  # the daemon's own growth pushed it past the cap
            victims = cache.evictions_for_pressure(residents, charged, cap, 1.0)
            self._evict(victims, f"the daemon holds {charged / MIB:.0f} MiB, over memory.model_memory_mb")
        if sample.pressure <= memory.high_watermark:
            self._stuck = False
            return
        victims = cache.evictions_for_pressure(residents, sample.used, sample.total, memory.low_watermark)
        self._evict(victims, f"memory pressure {sample.pressure:.0%} over the high watermark")
        if not victims and not self._stuck:
            log.warning("memory pressure %.0f%% but no idle unpinned model to evict", sample.pressure * 100)
        self._stuck = not victims

    def _tell_pressure(self, pressure: float, source: str) -> None:
        """Publish the memory pressure crossing the high watermark, and falling back under the low one."""
        memory = self.registry.settings.memory
        crossed = pressure > memory.high_watermark if not self._pressed else pressure < memory.low_watermark
        if crossed:
            self._pressed = not self._pressed
            event = "pressure_high" if self._pressed else "pressure_normal"
            self.registry.events.memory(event, pressure=round(pressure, 4), source=source,
                                        high_watermark=memory.high_watermark, low_watermark=memory.low_watermark)

    def _evict(self, victims: list[str], reason: str) -> None:
        for model_id in victims:
            entry = self.registry.entries[model_id]
            if entry.model is not None:  # not already unloaded by an earlier rule this round
                self.registry.evict(entry, reason)


async def warm_start(registry: Registry) -> None:
    """Reload pinned models, then those warm before the last stop, most recent first, as memory allows."""
    order = [e.id for e in registry.entries.values() if e.pinned] + registry.warm_models()
    for model_id in dict.fromkeys(order):
        entry = registry.entries.get(model_id)
        if entry is None or entry.state != "available":
            continue
        try:
            await registry.load(entry)
        except EmbedError as exc:
            log.warning("model %s: not reloaded at start: %s", model_id, exc.message)
