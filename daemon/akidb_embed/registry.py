"""The model registry: what the catalog's changes mean for loaded models, and the model cache.

``scan`` has the catalog (``catalog.py``) reconcile its entries with the directory and acts on
each change: a new pinned manifest loads; a changed manifest or model file loads the new version
in the background while the old one serves, then swaps; a removed manifest retires its model
once its requests finish. ``acquire`` hands out reference-counted models, loading on first use
(one load however many ask, unless the entry's circuit is open: ``circuit.py``), after evicting
least recently used idle models until the new one fits the budget (``ledger.py`` keeps the charges
and says what a load needs evicted). ``snapshot``, ``describe`` and ``candidates`` hand out copies
(``views.py``) for ``status``, ``models`` and routing.
Everything here runs on the event-loop thread; loads and unloads run on the loader thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from akidb_embed_client.errors import InsufficientMemory, ModelUnavailable, UnknownModel

from . import views
from .catalog import Catalog, Entry
from .circuit import Circuit
from .events import EventPublisher
from .loader import LoadedModel, load_model
from .manifest import Manifest
from .ledger import Ledger
from .memory import MemoryMonitor
from .profile import Profile, measure
from .routing import Candidate
from .settings import Settings
from .state import StateStore
from .stats import ModelStats

log = logging.getLogger(__name__)


class Registry:
    """Catalog entries by model id; loading, swapping, evicting and unloading their models."""

    def __init__(self, settings: Settings, monitor: MemoryMonitor, store: StateStore) -> None:
        self.settings = settings
        self.store = store
        self.catalog = Catalog(settings.catalog, settings.all_model_roots)
        self.entries = self.catalog.entries  # by model id; the catalog keeps them in step with the directory
        self.ledger = Ledger(settings.memory, monitor, store, self.entries)  # the charges, what a load must evict
        self.evictions = 0
        self.events = EventPublisher()  # bound by the app beside the request socket
        # One loader thread: loads and closes happen one at a time, in the order they were asked for.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")

    def scan(self) -> None:
        """Reconcile the entries with the catalog directory (see ``catalog``)."""
        self.catalog.scan(self)
        log.info("catalog %s: %s; default model %s", self.settings.catalog, self.catalog.summary(), self.default_id())

    def added(self, entry: Entry) -> None:
        publish = functools.partial(self.events.model, model_id=entry.id)
        entry.circuit = Circuit(entry.id, self.settings.circuit, publish)
        self.events.model("discovered", entry.id, state=entry.state, error=entry.error)
        entry.pinned = (entry.manifest is not None and entry.manifest.pinned) or self.store.recorded(entry.id).pinned
        if not entry.error and entry.pinned and entry.manifest.enabled:
            self._start_load(entry)  # pinned: loaded as soon as it is known (at start, after readiness)

    def removed(self, entry: Entry) -> None:
        self.events.model("removed", entry.id)
        self._unload(entry)

    def changed(self, entry: Entry) -> None:
        entry.pinned = entry.manifest.pinned or self.store.recorded(entry.id).pinned
        entry.circuit.reset("a new version")
        if not entry.manifest.enabled:
            self.unload(entry, "disabled in its manifest")
        elif entry.model is not None and entry.loading is None:
            self._start_load(entry)  # hot swap: the old version serves until the new one is ready

    def default_id(self) -> str | None:
        """The configured default model, else the manifest marked default = true, else the only model."""
        if self.settings.default_model:
            return self.settings.default_model
        enabled = [e for e in self.entries.values() if e.manifest and e.manifest.enabled]
        marked = [e.id for e in enabled if e.manifest.default]
        return marked[0] if marked else enabled[0].id if len(enabled) == 1 else None

    async def acquire(self, model_id: str | None, keep_alive: float | None = None) -> LoadedModel:
        """A loaded, reference-counted model; pair with ``release``."""
        entry = self.entry(model_id)
        if entry.model is None:
            await self.load(entry)
        model = entry.model
        if model is None:  # unloaded or removed while this request waited for the load
            raise ModelUnavailable(f"model {entry.id!r} was unloaded while loading; retry")
        model.in_flight += 1
        model.last_used = time.time()
        if keep_alive is not None:
            model.keep_alive = keep_alive
        return model

    def release(self, model: LoadedModel, served: int | None = 0) -> None:
        """Drop one reference (``served`` texts of an embed request; None: no request, a bench); a retired (or
        keep_alive = 0) model unloads when its last request is done."""
        model.in_flight -= 1
        if served is not None:
            model.requests += 1
            model.served += served
        model.last_used = time.time()
        if model.in_flight:
            return
        entry = self.entries.get(model.manifest.id)
        if model.retired:
            self._close(model)
        elif model.keep_alive == 0 and entry is not None and entry.model is model and not entry.pinned:
            self.unload(entry, "keep_alive 0")

    async def load(self, entry: Entry) -> None:
        """Load the entry's newest version unless it is loaded; every caller shares one load, which an open circuit
        refuses (past its backoff, one caller's load is the trial)."""
        if entry.loading is None and entry.model is not None:
            return
        entry.circuit.admit()
        if entry.loading is None:
            self._start_load(entry)
        await asyncio.shield(entry.loading)

    def unload(self, entry: Entry, reason: str = "on request", event: str = "unloaded") -> asyncio.Future | None:
        """Unload now; requests in flight finish on it first. The future, if any, is the close under way."""
        log.info("model %s: unloading (%s)", entry.id, reason)
        if entry.model is not None:
            self.events.model(event, entry.id, fingerprint=entry.model.fingerprint, reason=reason)
        return self._unload(entry)

    def evict(self, entry: Entry, reason: str) -> None:
        """Unload an idle model to free memory, counted as an eviction."""
        self.evictions += 1
        entry.stats.evictions += 1
        self.unload(entry, reason, event="evicted")

    async def retune(self, entry: Entry) -> None:
        """Measure the model's footprint and speed settings again and load it with them (a swap if loaded)."""
        await self.load(entry)  # its fingerprint is known once loaded
        while entry.loading is not None:  # a swap under way would keep the old figures
            await asyncio.shield(entry.loading)
        self.ledger.forget(entry.model.fingerprint)
        log.info("model %s: tuning again on request", entry.id)
        self._start_load(entry)
        await asyncio.shield(entry.loading)

    async def bench(self, entry: Entry, latency_texts: int) -> Profile:
        """Profile the entry's model through its queue (loading it first if need be), and keep the profile."""
        model = await self.acquire(entry.id)
        try:
            # Unloaded or swapped out meanwhile, the model still has its own charge.
            measured = await measure(
                model, lambda: self.ledger.footprint(entry) if entry.model is model else model.charge, latency_texts
            )
        finally:
            self.release(model, served=None)
        self.store.state.profiles[measured.key] = measured.as_dict()
        self._save()
        return measured

    def pin(self, entry: Entry, pinned: bool) -> None:
        entry.pinned = pinned
        self.store.record(entry.id).pinned = pinned
        self._save()

    def entry(self, model_id: str | None) -> Entry:
        """The entry for a request's model (None: the default), if it can serve."""
        if model_id is None:
            model_id = self.default_id()
            if model_id is None:
                raise UnknownModel("no model given and no default model; name one or set default = true in a manifest")
        entry = self.entries.get(model_id)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise UnknownModel(f"no model {model_id!r} in the catalog {self.settings.catalog} (models: {known})")
        if entry.manifest is None or not entry.manifest.enabled:
            why = entry.error or "it is disabled (enabled = false in its manifest)"
            raise ModelUnavailable(f"model {model_id!r} cannot serve: {why}")
        return entry

    async def close(self) -> None:
        """Unload every model and stop the loader thread."""
        self._save()  # the warm set as it is now, before it empties
        for entry in self.entries.values():
            if entry.loading is not None:
                entry.loading.cancel()
            model, entry.model = entry.model, None
            if model is not None:
                self._retire(model)
        await asyncio.get_running_loop().run_in_executor(self._loader, lambda: None)  # closes queued before
        self._loader.shutdown(wait=True)
        self.store.save(self.store.state.warm)  # with what the unloads released

    def warm_models(self) -> list[str]:
        """The models loaded at the last stop, most recently used first."""
        return list(self.store.state.warm)

    def model_stats(self) -> dict[str, ModelStats]:
        """Each model id's live statistics (read them on the event loop only)."""
        return {model_id: entry.stats for model_id, entry in self.entries.items()}

    def snapshot(self) -> views.Snapshot:
        """Every entry described, the memory sample and the cache's figures, copied for ``status`` and ``models``."""
        return views.snapshot(self)

    def candidates(self) -> list[Candidate]:
        """Every entry as ``auto`` routing judges it (cheaper than ``snapshot``: no statistics)."""
        return [views.candidate(self, entry) for entry in self.entries.values()]

    def describe(self, model_id: str) -> dict[str, Any]:
        """One catalog entry as the ``models`` reply lists it (a copy: changing it changes nothing here)."""
        return views.describe(self, self.entries[model_id])

    def _start_load(self, entry: Entry) -> None:
        entry.loading = asyncio.ensure_future(self._load_newest(entry))
        entry.loading.add_done_callback(lambda task: _finish_load(entry, task))

    async def _load_newest(self, entry: Entry) -> None:
        """Load the entry's newest manifest, again if it changed meanwhile, then swap it in."""
        loop = asyncio.get_running_loop()
        manifest = entry.manifest
        if not manifest.enabled:  # disabled while an earlier version was loading
            raise ModelUnavailable(f"model {entry.id!r} is disabled (enabled = false in its manifest)")
        record = self.store.record(entry.id)
        try:
            self._make_room(entry, manifest)
            keep_alive = views.default_keep_alive(manifest, self.settings)
            known = self.ledger.known_footprints()
            model = await loop.run_in_executor(self._loader, load_model, manifest, self.settings, loop, keep_alive, known)
        except InsufficientMemory as exc:
            log.warning("model %s: not loaded: %s", entry.id, exc.message)
            if entry.model is not None:
                entry.update_error = exc.message  # a swap that found no room: the old version serves
            raise
        except Exception as exc:
            if entry.manifest is not manifest:
                return await self._load_newest(entry)
            self._fail(entry, exc)
            raise ModelUnavailable(f"model {entry.id!r} failed to load: {exc}",
                                   retry_after_ms=entry.circuit.retry_after_ms()) from None  # nil: the old one serves
        if self.entries.get(entry.id) is not entry or entry.manifest is not manifest:
            self._close(model)  # removed or changed again while it loaded
            if self.entries.get(entry.id) is not entry:
                raise ModelUnavailable(f"model {entry.id!r} was removed while loading")
            return await self._load_newest(entry)
        old, entry.model = entry.model, model
        entry.error = entry.update_error = None  # what kept it, or a newer version, from serving is over
        entry.circuit.succeeded()
        if old is not None:
            log.info("model %s: swapped to fingerprint %s", entry.id, model.fingerprint)
            entry.stats.swaps += 1
            self.events.model("swapped", entry.id, old_fingerprint=old.fingerprint, fingerprint=model.fingerprint)
            self._retire(old)
        else:
            entry.stats.cold_loads += 1
            self.events.model("loaded", entry.id, fingerprint=model.fingerprint, load_ms=round(model.load_seconds * 1e3, 1))
        self.ledger.remember(record, model)
        record.load_ms = model.load_seconds * 1e3
        self._save()

    def _make_room(self, entry: Entry, manifest: Manifest) -> None:
        """Evict what a load of ``manifest`` needs gone, or raise InsufficientMemory."""
        for model_id in self.ledger.evictions_for(entry, manifest):
            self.evict(self.entries[model_id], f"least recently used, to make room for {entry.id}")

    def _fail(self, entry: Entry, exc: Exception) -> None:
        message = f"{exc}; fix it and replace the files (a new version is tried at once)"
        log.error("model %s: load failed: %s", entry.id, message)
        self.events.model("failed", entry.id, error=message, serving=entry.model is not None)
        if entry.model is not None:
            entry.update_error = message  # the old version keeps serving
        else:
            entry.error = message
            entry.circuit.failed(f"its load failed: {exc}", at_once=True)

    def _unload(self, entry: Entry) -> asyncio.Future | None:
        model, entry.model = entry.model, None
        if model is None:
            return None
        closing = self._retire(model)
        self._save()
        return closing

    def _retire(self, model: LoadedModel) -> asyncio.Future | None:
        model.retired = True
        return self._close(model) if model.in_flight == 0 else None

    def _close(self, model: LoadedModel) -> asyncio.Future:
        """Close on the loader thread (after loads queued before it), remembering the peak it reached."""
        record = self.store.record(model.manifest.id)
        current = self.entries.get(model.manifest.id)
        if record.fingerprint == model.fingerprint and (current is None or current.model in (None, model)):
            self.ledger.remember(record, model)  # not a version swapped out: that would undo the new one's figures
        return asyncio.get_running_loop().run_in_executor(self._loader, model.close)

    def _save(self) -> None:
        self.ledger.book_charges()  # models came or went
        loaded = sorted((e.model for e in self.entries.values() if e.model), key=lambda m: -m.last_used)
        for model in loaded:
            self.store.record(model.manifest.id).last_used = model.last_used
        self.store.save([m.manifest.id for m in loaded])

def _finish_load(entry: Entry, task: asyncio.Task) -> None:
    if entry.loading is task:
        entry.loading = None
    entry.circuit.abandoned()  # a trial load that ended without a verdict (no room, removed, cancelled)
    if not task.cancelled():
        task.exception()  # retrieved here: a background swap may have no one awaiting it
