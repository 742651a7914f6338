"""The catalog directory: one ``Entry`` per manifest, reconciled with the files on every scan.

``Catalog.scan`` reads every ``*.toml`` (at start, on SIGHUP and on every watcher event, so a
missed event cannot leave it wrong) and compares it with what it knew: a new manifest is added,
a removed one dropped, a changed manifest or model file (size, mtime, inode) becomes the
entry's newest version, and a manifest that does not parse, or names a file outside the model
roots (``confine.py``), is listed with its error but never replaces a working version. What a change means for loaded models (load, swap, unload) is the
registry's business: it hears of each change through ``CatalogEvents``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import confine
from .circuit import Circuit
from .loader import LoadedModel
from .manifest import Manifest, ManifestError, load_manifest, version_files
from .stats import ModelStats

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
    stats: ModelStats = field(default_factory=ModelStats)
    # Given by the registry when it hears of the entry: it holds the settings and the events.
    circuit: Circuit = field(init=False, repr=False)

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


class CatalogEvents(Protocol):
    """What the registry does when the catalog changes."""

    def added(self, entry: Entry) -> None: ...

    def removed(self, entry: Entry) -> None: ...

    def changed(self, entry: Entry) -> None:
        """The entry has a new valid manifest or model files (its error fields are already cleared)."""


class Catalog:
    """Entries by model id, as the catalog directory last showed them."""

    def __init__(self, directory: Path, roots: tuple[Path, ...]) -> None:
        self.directory = directory
        self.roots = roots  # the folders the files manifests name must resolve under (confine.py)
        self.entries: dict[str, Entry] = {}

    def scan(self, events: CatalogEvents) -> None:
        """Reconcile the entries with the manifests now in the directory."""
        paths = sorted(self.directory.glob("*.toml"))
        found = {entry.id: entry for entry in (read_entry(path, self.roots) for path in paths)}
        for model_id, entry in list(self.entries.items()):
            new = found.pop(model_id, None)
            if new is None:
                log.info("model %s: manifest removed", model_id)
                del self.entries[model_id]
                events.removed(entry)
            elif self._update(entry, new):
                events.changed(entry)
        for model_id, entry in found.items():
            self.entries[model_id] = entry
            if entry.error:
                log.error("model %s: %s", model_id, entry.error)
            events.added(entry)

    def summary(self) -> str:
        """Entries by state, e.g. ``2 available, 1 invalid``."""
        states = [e.state for e in self.entries.values()]
        return ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "no manifests"

    @staticmethod
    def _update(entry: Entry, new: Entry) -> bool:
        """Take ``new``'s version into ``entry`` if it is valid and different; whether it was."""
        if new.manifest is None:  # a broken (perhaps half-written) version never replaces a working one
            if entry.manifest is None:
                entry.error = new.error
            elif entry.update_error != new.error:
                entry.update_error = new.error
                log.error("model %s: new manifest ignored, the previous version stays: %s", entry.id, new.error)
            return False
        if (new.manifest, new.files) == (entry.manifest, entry.files):
            if entry.model is None or entry.model.manifest == entry.manifest:
                entry.update_error = None  # a half-written file was completed as it was
            return False
        log.info("model %s: new version (manifest or model files changed)", entry.id)
        entry.manifest, entry.files, entry.path = new.manifest, new.files, new.path
        entry.error = entry.update_error = None
        return True


def read_entry(path: Path, roots: tuple[Path, ...]) -> Entry:
    """The entry of one manifest file: its manifest and file stats, or the error that it has (a manifest naming a
    file outside ``roots`` is refused before any of its files is looked at)."""
    try:
        confine.check_file(path, "manifest", roots)  # a symlink in the catalog is no way out either
        manifest = load_manifest(path)
        confine.check(manifest, roots)
    except ManifestError as exc:
        return Entry(path.stem, path, error=str(exc))
    return Entry(manifest.id, path, manifest, files=file_stats(manifest))


def file_stats(manifest: Manifest) -> tuple:
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
