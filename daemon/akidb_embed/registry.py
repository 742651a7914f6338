"""The model registry: manifests of the catalog and the models loaded from them.

``scan`` reads the catalog directory and reconciles: new manifests become available, changed
ones replace the old entry (its loaded model is retired once its requests finish), removed
ones are retired, broken ones are listed with their error and never affect the others.
``acquire`` hands out a reference-counted ``LoadedModel``, loading it on first use; concurrent
first requests share one load, and loads run off the event loop so other models keep serving.
Everything here runs on the event-loop thread except ``_load``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from akidb_embed_client.errors import ModelUnavailable, UnknownModel

from .backend import BackendError, OnnxBackend
from .batcher import Batcher
from .manifest import Manifest, ManifestError, fingerprint, load_manifest
from .settings import Settings
from .tokenize import TextEncoder

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to serve: its session, its batcher and its use counters."""

    manifest: Manifest
    fingerprint: str
    backend: OnnxBackend
    batcher: Batcher
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0
    requests: int = 0
    served: int = 0  # texts
    retired: bool = False

    def close(self) -> None:
        self.batcher.close()
        self.backend.close()


@dataclass
class Entry:
    """One manifest file of the catalog and what became of it."""

    id: str
    path: Path
    manifest: Manifest | None = None
    error: str | None = None
    model: LoadedModel | None = None
    loading: asyncio.Future | None = None

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
    """Catalog entries by model id, and single-flight loading of their models."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.entries: dict[str, Entry] = {}
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="load")

    def scan(self) -> None:
        """Reconcile the entries with the manifests now in the catalog directory."""
        found = {entry.id: entry for entry in map(_read_entry, sorted(self.settings.catalog.glob("*.toml")))}
        for model_id, old in self.entries.items():
            new = found.get(model_id)
            if new is not None and old.error is None and (old.manifest, old.path) == (new.manifest, new.path):
                found[model_id] = old  # unchanged: keep it, loaded or not
            else:
                log.info("model %s: manifest %s", model_id, "changed" if new else "removed")
                self._retire(old)
        for entry in found.values():
            if entry.error and entry.manifest is None:
                log.error("model %s: %s", entry.id, entry.error)
        self.entries = found
        log.info("catalog %s: %s; default model %s", self.settings.catalog, self._summary(), self.default_id())

    def default_id(self) -> str | None:
        """The configured default model, else the manifest marked default = true, else the only model."""
        if self.settings.default_model:
            return self.settings.default_model
        enabled = [e for e in self.entries.values() if e.manifest and e.manifest.enabled]
        marked = [e.id for e in enabled if e.manifest.default]
        return marked[0] if marked else enabled[0].id if len(enabled) == 1 else None

    async def acquire(self, model_id: str | None) -> LoadedModel:
        """A loaded, reference-counted model; pair with ``release``."""
        entry = self._entry(model_id)
        if entry.model is None:
            await self._ensure_loaded(entry)
        model = entry.model
        if model is None:  # retired by a rescan while this request waited for the load
            raise ModelUnavailable(f"model {entry.id!r} was replaced while loading; retry")
        model.in_flight += 1
        model.last_used = time.time()
        return model

    def release(self, model: LoadedModel, served: int = 0) -> None:
        """Drop one reference; a retired model closes when its last request is done."""
        model.in_flight -= 1
        model.served += served
        model.requests += 1
        if model.retired and model.in_flight == 0:
            model.close()

    def describe(self) -> list[dict[str, Any]]:
        """Every entry with its state and, when loaded, its counters (for ``models``)."""
        return [self._describe(entry) for entry in self.entries.values()]

    async def close(self) -> None:
        """Retire every model and stop the loader threads."""
        for entry in self.entries.values():
            self._retire(entry)
        self._loader.shutdown(wait=True)

    def _entry(self, model_id: str | None) -> Entry:
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

    async def _ensure_loaded(self, entry: Entry) -> None:
        if entry.error:
            raise ModelUnavailable(f"model {entry.id!r} failed to load: {entry.error}")
        if entry.loading is None:
            entry.loading = asyncio.ensure_future(self._load_entry(entry))
        await asyncio.shield(entry.loading)

    async def _load_entry(self, entry: Entry) -> None:
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self._loader, self._load, entry.manifest, loop)
        except Exception as exc:
            entry.error = f"{exc}; fix it and rescan (SIGHUP / systemctl reload akidb-embed)"
            log.error("model %s: load failed: %s", entry.id, exc)
            raise ModelUnavailable(f"model {entry.id!r} failed to load: {entry.error}") from None
        finally:
            entry.loading = None
        if self.entries.get(entry.id) is not entry:  # its manifest changed or went while it loaded
            model.close()
            raise ModelUnavailable(f"model {entry.id!r} changed while loading; retry")
        entry.model = model

    def _load(self, manifest: Manifest, loop: asyncio.AbstractEventLoop) -> LoadedModel:
        """Build session, tokenizer and batcher, and check them on a warm-up batch (loader thread)."""
        started = time.perf_counter()
        digest = _fingerprint(manifest)
        encoder = _text_encoder(manifest)
        backend = OnnxBackend(
            manifest.model,
            manifest.providers or self.settings.providers,
            self.settings.cache_dir / "tensorrt" / digest,
            self.settings.intra_op_threads,
        )
        _warm_up(manifest, encoder, backend)
        batcher = Batcher(manifest.id, encoder, backend, manifest.pooling, manifest.dimension, self.settings.limits, loop)
        seconds = time.perf_counter() - started
        log.info("model %s: loaded in %.0f ms on %s (fingerprint %s)", manifest.id, seconds * 1e3, backend.providers[0], digest)
        return LoadedModel(manifest, digest, backend, batcher, seconds)

    def _retire(self, entry: Entry) -> None:
        model, entry.model = entry.model, None
        if model is None:
            return
        model.retired = True
        if model.in_flight == 0:
            model.close()

    def _describe(self, entry: Entry) -> dict[str, Any]:
        info = entry.manifest.describe() if entry.manifest else {"id": entry.id}
        info.update(state=entry.state, error=entry.error, path=str(entry.path))
        if entry.model is not None:
            m = entry.model
            info.update(
                fingerprint=m.fingerprint,
                provider=m.backend.providers[0],
                loaded_at=m.loaded_at,
                last_used=m.last_used,
                in_flight=m.in_flight,
                requests=m.requests,
                served=m.served,
                load_ms=round(m.load_seconds * 1e3, 1),
                queued_texts=m.batcher.queued_texts,
                batches=m.batcher.batches_run,
            )
        return info

    def _summary(self) -> str:
        states = [e.state for e in self.entries.values()]
        return ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "no manifests"


def _read_entry(path: Path) -> Entry:
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        return Entry(path.stem, path, error=str(exc))
    return Entry(manifest.id, path, manifest)


def _fingerprint(manifest: Manifest) -> str:
    try:
        return fingerprint(manifest)
    except OSError as exc:
        raise BackendError(f"cannot read {exc.filename}: {exc.strerror}; fix the path in {manifest.path}") from None


def _text_encoder(manifest: Manifest) -> TextEncoder:
    try:
        return TextEncoder(manifest.tokenizer, manifest.max_length, manifest.padding_side)
    except Exception as exc:  # tokenizers raises a bare Exception for a corrupt file
        raise BackendError(f"tokenizer {manifest.tokenizer} cannot be read: {exc}") from None


def _warm_up(manifest: Manifest, encoder: TextEncoder, backend: OnnxBackend) -> None:
    """Run a tiny batch so a wrong model fails at load, not on a user's request."""
    padded = encoder.pad(encoder.encode(["warm up", "a second, longer warm-up text"]))
    states = backend.run(padded)
    if states.shape[-1] != manifest.dimension:
        raise BackendError(
            f"{manifest.model} produces {states.shape[-1]}-dimensional states but the manifest says "
            f"dimension = {manifest.dimension}; fix the manifest"
        )
