"""Catalog watching: rescan when a manifest, or a file of a model it names, changes on disk.

A watchdog observer (inotify on Linux) watches the catalog directory for ``*.toml`` files and,
non-recursively, each directory holding files the manifests name for any file; editor,
download and package-manager temporaries are ignored. Events are not interpreted beyond that
filter: a burst of them is debounced into one ``on_change()`` call on the event loop, where the
registry's ``scan`` reconciles the whole directory. After each call the watched directories
are brought in line with the manifests (``sync``). A catalog directory that does not exist
yet is waited for by watching its parent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from .manifest import Manifest, is_temporary, version_files

log = logging.getLogger(__name__)

# Only these reach Python. On Linux the filter also narrows the inotify mask, so the daemon
# reading its own manifests and models (open, access, close) raises no events at all, and the
# directory-modified event that accompanies every file event is dropped at the source.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,  # also a file moved in from an unwatched directory
    FileModifiedEvent,
    FileDeletedEvent,  # also a file moved out
    FileMovedEvent,
    DirCreatedEvent,  # the awaited catalog directory appearing
    DirDeletedEvent,  # a watched directory going away (its inotify watch dies with it)
    DirMovedEvent,
]

# What a watched directory is watched for; a directory can be more than one.
CATALOG = "catalog"  # manifests: *.toml
MODELS = "models"  # files a manifest names: any file
PARENT = "parent"  # the catalog's parent while the catalog does not exist

Roles = dict[str, frozenset[str]]


class CatalogWatcher:
    """Calls ``on_change`` on the event loop once changes to the catalog or model files settle."""

    def __init__(
        self,
        catalog: Path,
        on_change: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        *,
        extra_directories: Callable[[], Iterable[Path]] | None = None,
        debounce: float = 0.15,
    ) -> None:
        # Not resolved: event paths are built from the watched path as given.
        self.catalog = os.path.abspath(catalog)
        self._on_change = on_change
        self._loop = loop
        self._extra_directories = extra_directories or (lambda: ())
        self._debounce = debounce
        self._handler = _Handler(self)
        self._observer: BaseObserver | None = None
        self._debouncer: _Debouncer | None = None
        self._watches: dict[str, tuple[ObservedWatch, tuple[int, int]]] = {}  # path -> watch, (dev, inode)
        self._roles: Roles = {}  # replaced whole, never mutated: the observer thread reads it
        self._queued = False  # a call is waiting on the loop
        self._waiting = False  # the catalog is missing and its parent is watched instead

    @property
    def directories(self) -> set[Path]:
        """The directories watched now."""
        return {Path(path) for path in self._watches}

    def start(self) -> None:
        """Start watching the catalog and the model directories as they are now (idempotent)."""
        if self._observer is not None:
            return
        self._debouncer = _Debouncer(self._debounce, self._schedule_change)
        self._observer = Observer()
        self._observer.start()  # before scheduling: a missing directory then fails at once
        self.sync()
        log.info("watching %d directories for catalog changes", len(self._watches))

    def stop(self) -> None:
        """Stop watching, drop a pending call and join the watcher's threads (idempotent)."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()  # unschedules every watch and joins their threads
        observer.join()
        if self._debouncer is not None:
            self._debouncer.close()
        self._watches.clear()
        self._roles = {}

    def sync(self) -> None:
        """Watch the catalog (or its parent until it exists) and the current model directories."""
        observer = self._observer
        if observer is None:
            return
        roles, appeared = self._wanted()
        alive = {emitter.watch for emitter in list(observer.emitters) if emitter.is_alive()}
        for path, (watch, identity) in list(self._watches.items()):
            # A directory deleted (its emitter stopped) or replaced (another inode) is watched anew.
            if path not in roles or watch not in alive or _identity(path) != identity:
                observer.unschedule(watch)
                del self._watches[path]
        self._roles = roles
        for path in roles.keys() - self._watches.keys():
            try:
                identity = _identity(path)
                self._watches[path] = (observer.schedule(self._handler, path, event_filter=_EVENTS), identity)
            except OSError as exc:  # gone since _wanted looked, or out of inotify watches
                log.warning("cannot watch %s: %s", path, exc)
        if appeared and self._debouncer is not None:
            # Manifests written between the last scan and this watch would go unseen: scan again.
            log.info("catalog %s appeared; watching it", self.catalog)
            self._debouncer.poke()

    def _wanted(self) -> tuple[Roles, bool]:
        """The directories to watch with their roles, and whether the catalog has just appeared."""
        roles: dict[str, set[str]] = {}
        appeared = False
        if os.path.isdir(self.catalog):
            roles[self.catalog] = {CATALOG}
            appeared, self._waiting = self._waiting, False
        else:
            parent = os.path.dirname(self.catalog)
            if not self._waiting:
                if os.path.isdir(parent):
                    log.warning("catalog %s does not exist; watching %s for it to appear", self.catalog, parent)
                else:
                    log.warning("catalog %s does not exist, nor does %s; create it and rescan (SIGHUP)", self.catalog, parent)
            self._waiting = True
            roles[parent] = {PARENT}
        try:
            extra = set(self._extra_directories())
        except Exception:  # a bug there must not stop the catalog watch
            log.exception("cannot list the model directories to watch")
            extra = set()
        for directory in sorted(map(os.path.abspath, extra)):
            if os.path.isdir(directory):
                roles.setdefault(directory, set()).add(MODELS)
            else:
                log.debug("model directory %s does not exist; not watching it", directory)
        return {path: frozenset(kinds) for path, kinds in roles.items() if os.path.isdir(path)}, appeared

    def _on_event(self, event: FileSystemEvent) -> None:
        """Start or extend the quiet period when the event is one that counts (observer thread)."""
        paths = (os.fsdecode(path) for path in (event.src_path, event.dest_path) if path)
        if any(self._counts(path, event.is_directory) for path in paths) and self._debouncer is not None:
            log.debug("catalog watch: %s", event)
            self._debouncer.poke()

    def _counts(self, path: str, is_directory: bool) -> bool:
        """Whether an event at ``path`` may change what a scan finds."""
        roles = self._roles
        parent, name = os.path.split(path)
        if is_directory:  # a watched directory itself going, or the awaited catalog appearing
            return path in roles or (path == self.catalog and PARENT in roles.get(parent, ()))
        kinds = roles.get(parent)
        if not kinds or is_temporary(name):
            return False
        return MODELS in kinds or (CATALOG in kinds and name.endswith(".toml"))

    def _schedule_change(self) -> None:
        """Queue one ``on_change`` on the loop, unless one is already waiting there (debounce thread)."""
        if self._queued:  # it has not started yet, so its scan will see these changes too
            return
        self._queued = True
        try:
            self._loop.call_soon_threadsafe(self._changed)
        except RuntimeError:  # the loop is closed: the daemon is exiting
            self._queued = False
            log.debug("event loop closed; catalog change dropped")

    def _changed(self) -> None:
        self._queued = False  # changes from now on need another call
        if self._observer is None:  # stopped while this call waited
            return
        try:
            self._on_change()
        except Exception:
            log.exception("catalog rescan after a change failed")
        self.sync()


def model_directories(manifests: Iterable[Manifest]) -> set[Path]:
    """The directories of the files the manifests name, golden vectors included (the daemon's ``extra_directories``)."""
    return {path.parent for manifest in manifests for path in version_files(manifest)}


def _identity(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


class _Handler(FileSystemEventHandler):
    """Hands every event to the watcher's filter."""

    def __init__(self, watcher: CatalogWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._watcher._on_event(event)


class _Debouncer:
    """Calls ``fire`` once ``poke`` has not been called for ``delay`` seconds; its thread sleeps when idle."""

    def __init__(self, delay: float, fire: Callable[[], None]) -> None:
        self._delay = delay
        self._fire = fire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="catalog-debounce", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Start or extend the quiet period."""
        with self._cond:
            idle = self._deadline is None
            self._deadline = time.monotonic() + self._delay
            if idle:  # a thread already counting down finds the later deadline when it wakes
                self._cond.notify()

    def close(self) -> None:
        """Drop a pending call and join the thread."""
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._deadline = None
                try:
                    self._fire()
                except Exception:  # keep the thread for the next change
                    log.exception("catalog change notification failed")
