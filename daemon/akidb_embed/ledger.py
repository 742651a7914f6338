"""The model cache's memory accounts: what each model is charged, and what a load needs evicted.

A loaded model is charged its own measurement, or a larger one remembered for its id; a model not
loaded yet is estimated (``cache.estimate``: remembered, else its manifest, else its file size).
``evictions_for`` sets those charges, the memory sample and the ``[memory]`` limits before the
eviction policy (``cache.py``) to find which idle models a load needs gone, or why it cannot fit;
the registry does the evicting. ``book_charges`` totals the loaded models' charges, which also set
the heap guard's limit. Measurements are kept in the state file by fingerprint (``remember``,
``known_footprints``, ``forget``), so a restart, or another id naming the same content, loads
with them. Everything here runs on the event-loop thread.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict

from akidb_embed_client.errors import InsufficientMemory

from . import cache
from .catalog import Entry
from .footprint import Footprint
from .loader import LoadedModel
from .manifest import Manifest
from .memory import MIB, MemoryMonitor, MemorySample, process_rss
from .settings import MemorySettings
from .state import ModelRecord, StateStore
from .workmem import GUARD


class Ledger:
    """The charges of the catalog's models against the memory budget, and their remembered measurements."""

    def __init__(self, memory: MemorySettings, monitor: MemoryMonitor, store: StateStore,
                 entries: Mapping[str, Entry]) -> None:  # fmt: skip
        self.memory = memory
        self.monitor = monitor
        self.store = store
        self.entries = entries  # the catalog's, by model id
        self.unaccounted = 0  # bytes the daemon holds beyond its models' charges (upkeep measures it)
        self.idle_rss = process_rss()  # the daemon's resident size with no model; the app sets it once ready

    def memory_sample(self) -> MemorySample:
        """The memory source's latest figures."""
        return self.monitor.sample()

    def evictions_for(self, entry: Entry, manifest: Manifest) -> list[str]:
        """What a load of ``manifest`` needs evicted, or InsufficientMemory."""
        memory = self.memory
        sample = self.memory_sample()
        # Growth the charges do not explain still takes room under the cap.
        cap = max(1, memory.model_memory_mb * MIB - self.unaccounted) if memory.model_memory_mb else 0
        budget = cache.Budget(cap, memory.max_loaded_models, sample.available - memory.reserve_mb * MIB)
        residents = [r for r in self.residents() if r.id != entry.id or entry.model is not None]
        need = self.estimate(entry.id, manifest)[0]
        return cache.evictions_to_fit(entry.id, need, residents, budget)

    def no_room(self, entry: Entry, manifest: Manifest) -> str | None:
        """Why a load of ``manifest`` could not fit now, evictions included; None if it could."""
        try:
            self.evictions_for(entry, manifest)
        except InsufficientMemory as exc:
            return exc.message
        return None

    def residents(self) -> list[cache.Resident]:
        """Loaded and loading models as the eviction policy sees them."""
        residents = []
        for e in self.entries.values():
            if e.model is not None:
                idle = e.model.in_flight == 0 and not e.pinned and e.loading is None
                residents.append(cache.Resident(e.id, self.footprint(e), e.model.last_used, idle))
            elif e.loading is not None and e.manifest is not None:  # a load under way holds its reservation
                residents.append(cache.Resident(e.id, self.estimate(e.id, e.manifest)[0], time.time(), False))
        return residents

    def estimate(self, model_id: str, manifest: Manifest) -> tuple[int, str]:
        """Bytes a load will take and where the figure comes from."""
        return cache.estimate(self.store.recorded(model_id).footprint, manifest)

    def footprint(self, entry: Entry) -> int:
        """Bytes a loaded model is charged (its own measurement, or a remembered larger one)."""
        return max(entry.model.charge, self.store.recorded(entry.id).footprint)

    def book_charges(self) -> int:
        """Bytes charged to the loaded models together, which also set the heap guard's limit."""
        total = sum(self.footprint(e) for e in self.entries.values() if e.model is not None)
        GUARD.limit = self.idle_rss + total
        return total

    def known_footprints(self) -> dict[str, Footprint]:
        """Measured footprints by fingerprint: they belong to the model's content, whichever id names it."""
        known = {}
        for record in self.store.state.models.values():
            try:
                known[record.fingerprint] = Footprint.from_dict(record.memory)
            except (TypeError, KeyError):  # none yet, or written by another version: measured again
                continue
        return known

    def remember(self, record: ModelRecord, model: LoadedModel) -> None:
        """Record the model's charge and measurement, with the largest working memory it has shown."""
        record.fingerprint, record.footprint = model.fingerprint, model.charge
        record.memory = {**asdict(model.footprint), "peak": model.peak}

    def forget(self, fingerprint: str) -> None:
        """Drop the measurements of ``fingerprint``, whichever ids name it: its next load measures again."""
        for record in self.store.state.models.values():
            if record.fingerprint == fingerprint:
                record.memory = {}
