"""The model registry: the catalog's manifests and the models loaded from them.

``scan`` reconciles the entries with the catalog directory (at start, on SIGHUP and on every
watcher event, so a missed event cannot leave it wrong): new manifests become available; a
changed manifest or model file loads the new version in the background while the old one
serves, then swaps; a removed manifest retires its model once its requests finish; a manifest
that does not parse is listed with its error and never replaces a working version.
``acquire`` hands out reference-counted models, loading on first use (one load however many
ask), after evicting least recently used idle models until the new one fits the budget.
Everything here runs on the event-loop thread; loads and unloads run on the loader thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from akidb_embed_client.errors import InsufficientMemory, ModelUnavailable, UnknownModel

from . import cache
from .footprint import Footprint
from .loader import LoadedModel, load_model
from .manifest import Manifest, ManifestError, load_manifest, version_files
from .memory import MIB, MemoryMonitor, process_rss
from .settings import Settings
from .state import ModelRecord, StateStore
from .workmem import GUARD

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One manifest of the catalog and the model serving from it."""

    id: str
    path: Path
    manifest: Manifest | None = None  # the newest valid version
    files: tuple = ()  # size, mtime and inode of the files it names: a replaced file is a new version
    error: str | None = None  # why it cannot serve
    update_error: str | None = None  # why a newer version is not serving (the old one is)
    model: LoadedModel | None = None  # the version serving now
    loading: asyncio.Task | None = None
    pinned: bool = False

    @property
    def state(self) -> str:
        if self.manifest is None:
            return "invalid"
        if not self.manifest.enabled:
            return "disabled"
        if self.model is not None:
            return "ready"
        if self.loading is not None:
            return "loading"
        return "failed" if self.error else "available"


class Registry:
    """Catalog entries by model id; loading, swapping, evicting and unloading their models."""

    def __init__(self, settings: Settings, monitor: MemoryMonitor, store: StateStore) -> None:
        self.settings = settings
        self.monitor = monitor
        self.store = store
        self.entries: dict[str, Entry] = {}
        self.evictions = 0
        self.unaccounted = 0  # bytes the daemon holds beyond its models' charges (upkeep measures it)
        self.idle_rss = process_rss()  # the daemon's resident size with no model; the app sets it once ready
        # One loader thread: loads and closes happen one at a time, in the order they were asked for.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")

    def scan(self) -> None:
        """Reconcile the entries with the manifests now in the catalog directory."""
        found = {entry.id: entry for entry in map(_read_entry, sorted(self.settings.catalog.glob("*.toml")))}
        for model_id, entry in list(self.entries.items()):
            new = found.pop(model_id, None)
            if new is None:
                log.info("model %s: manifest removed", model_id)
                del self.entries[model_id]
                self._unload(entry)
            else:
                self._update(entry, new)
        for model_id, entry in found.items():
            entry.pinned = (entry.manifest is not None and entry.manifest.pinned) or self.store.recorded(model_id).pinned
            self.entries[model_id] = entry
            if entry.error:
                log.error("model %s: %s", model_id, entry.error)
            elif entry.pinned and entry.manifest.enabled:
                self._start_load(entry)  # pinned: loaded as soon as it is known (at start, after readiness)
        log.info("catalog %s: %s; default model %s", self.settings.catalog, self._summary(), self.default_id())

    def _update(self, entry: Entry, new: Entry) -> None:
        if new.manifest is None:  # a broken (perhaps half-written) version never replaces a working one
            if entry.manifest is None:
                entry.error = new.error
            elif entry.update_error != new.error:
                entry.update_error = new.error
                log.error("model %s: new manifest ignored, the previous version stays: %s", entry.id, new.error)
            return
        if (new.manifest, new.files) == (entry.manifest, entry.files):
            if entry.model is None or entry.model.manifest == entry.manifest:
                entry.update_error = None  # a half-written file was completed as it was
            if entry.model is None and entry.loading is None:
                entry.error = None  # a rescan retries a failed load
            return
        log.info("model %s: new version (manifest or model files changed)", entry.id)
        entry.manifest, entry.files, entry.path = new.manifest, new.files, new.path
        entry.error = entry.update_error = None
        entry.pinned = new.manifest.pinned or self.store.recorded(entry.id).pinned
        if not new.manifest.enabled:
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

    def release(self, model: LoadedModel, served: int = 0) -> None:
        """Drop one reference; a retired (or keep_alive = 0) model unloads when its last request is done."""
        model.in_flight -= 1
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
        """Load the entry's newest version unless it is loaded; every caller shares one load."""
        if entry.error:
            raise ModelUnavailable(f"model {entry.id!r} failed to load: {entry.error}")
        if entry.loading is None and entry.model is not None:
            return
        if entry.loading is None:
            self._start_load(entry)
        await asyncio.shield(entry.loading)

    def unload(self, entry: Entry, reason: str = "on request") -> asyncio.Future | None:
        """Unload now; requests in flight finish on it first. The future, if any, is the close under way."""
        log.info("model %s: unloading (%s)", entry.id, reason)
        return self._unload(entry)

    async def retune(self, entry: Entry) -> None:
        """Measure the model's footprint and speed settings again and load it with them (a swap if loaded)."""
        await self.load(entry)  # its fingerprint is known once loaded
        while entry.loading is not None:  # a swap under way would keep the old figures
            await asyncio.shield(entry.loading)
        digest = entry.model.fingerprint
        for record in self.store.state.models.values():
            if record.fingerprint == digest:
                record.memory = {}
        log.info("model %s: tuning again on request", entry.id)
        self._start_load(entry)
        await asyncio.shield(entry.loading)

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
            keep_alive = default_keep_alive(manifest, self.settings)
            known = self.known_footprints()
            model = await loop.run_in_executor(self._loader, load_model, manifest, self.settings, loop, keep_alive, known)
        except InsufficientMemory as exc:
            log.warning("model %s: not loaded: %s", entry.id, exc.message)
            if entry.model is not None:
                entry.update_error = exc.message  # a swap that found no room: the old version serves
            raise
        except Exception as exc:
            if entry.manifest is not manifest:
                return await self._load_newest(entry)
            self._fail(entry, f"{exc}; fix it and rescan (SIGHUP / systemctl reload akidb-embed)")
            raise ModelUnavailable(f"model {entry.id!r} failed to load: {exc}") from None
        if self.entries.get(entry.id) is not entry or entry.manifest is not manifest:
            self._close(model)  # removed or changed again while it loaded
            if self.entries.get(entry.id) is not entry:
                raise ModelUnavailable(f"model {entry.id!r} was removed while loading")
            return await self._load_newest(entry)
        old, entry.model = entry.model, model
        if old is not None:
            log.info("model %s: swapped to fingerprint %s", entry.id, model.fingerprint)
            self._retire(old)
        self._remember(record, model)
        record.load_ms = model.load_seconds * 1e3
        self._save()

    def known_footprints(self) -> dict[str, Footprint]:
        """Measured footprints by fingerprint: they belong to the model's content, whichever id names it."""
        known = {}
        for record in self.store.state.models.values():
            try:
                known[record.fingerprint] = Footprint.from_dict(record.memory)
            except (TypeError, KeyError):  # none yet, or written by another version: measured again
                continue
        return known

    def _remember(self, record: ModelRecord, model: LoadedModel) -> None:
        """Record the model's charge and measurement, with the largest working memory it has shown."""
        record.fingerprint, record.footprint = model.fingerprint, model.charge
        record.memory = {**asdict(model.footprint), "peak": model.peak}

    def _make_room(self, entry: Entry, manifest: Manifest) -> None:
        """Evict what a load of ``manifest`` needs gone, or raise InsufficientMemory."""
        memory = self.settings.memory
        sample = self.monitor.sample()
        # Growth the charges do not explain still takes room under the cap.
        cap = max(1, memory.model_memory_mb * MIB - self.unaccounted) if memory.model_memory_mb else 0
        budget = cache.Budget(cap, memory.max_loaded_models, sample.available - memory.reserve_mb * MIB)
        residents = [r for r in self.residents() if r.id != entry.id or entry.model is not None]
        need = self.estimate(entry.id, manifest)[0]
        for model_id in cache.evictions_to_fit(entry.id, need, residents, budget):
            self.evictions += 1
            self.unload(self.entries[model_id], f"least recently used, to make room for {entry.id}")

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

    def _fail(self, entry: Entry, message: str) -> None:
        log.error("model %s: load failed: %s", entry.id, message)
        if entry.model is not None:
            entry.update_error = message  # the old version keeps serving
        else:
            entry.error = message

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
            self._remember(record, model)  # not a version swapped out: that would undo the new one's figures
        return asyncio.get_running_loop().run_in_executor(self._loader, model.close)

    def book_charges(self) -> int:
        """Bytes charged to the loaded models together, which also set the heap guard's limit."""
        total = sum(self.footprint(e) for e in self.entries.values() if e.model is not None)
        GUARD.limit = self.idle_rss + total
        return total

    def _save(self) -> None:
        self.book_charges()  # models came or went
        loaded = sorted((e.model for e in self.entries.values() if e.model), key=lambda m: -m.last_used)
        for model in loaded:
            self.store.record(model.manifest.id).last_used = model.last_used
        self.store.save([m.manifest.id for m in loaded])

    def _summary(self) -> str:
        states = [e.state for e in self.entries.values()]
        return ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "no manifests"


def _finish_load(entry: Entry, task: asyncio.Task) -> None:
    if entry.loading is task:
        entry.loading = None
    if not task.cancelled():
        task.exception()  # retrieved here: a background swap may have no one awaiting it


def default_keep_alive(manifest: Manifest, settings: Settings) -> float:
    """A model's keep_alive: its manifest's, else the daemon's default."""
    return manifest.keep_alive if manifest.keep_alive is not None else settings.memory.keep_alive


def _read_entry(path: Path) -> Entry:
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        return Entry(path.stem, path, error=str(exc))
    return Entry(manifest.id, path, manifest, files=_file_stats(manifest))


def _file_stats(manifest: Manifest) -> tuple:
    """Size, mtime and inode of every file the model is made of, golden vectors included: a replaced file is a new
    version."""
    stats = []
    for path in version_files(manifest):
        try:
            st = path.stat()
            stats.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stats.append(None)
    return tuple(stats)
