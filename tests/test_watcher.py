"""The catalog watcher on real files, the real watchdog observer and a real event loop: what
triggers a rescan, how bursts collapse, which temporaries are ignored, and a clean stop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from akidb_embed.manifest import is_temporary
from akidb_embed.watcher import CatalogWatcher

QUIET = 0.6  # s without a call that shows an event was ignored
SETTLE = 0.35  # s for stray calls after a burst to show up (over twice the debounce)
MANIFEST = 'id = "{id}"\nmodel = "model.onnx"\ntokenizer = "tokenizer.json"\ndimension = 8\n'


class Calls:
    """The on_change callback: when each call came and on which thread."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.threads: set[int] = set()
        self._arrived = asyncio.Event()

    def __call__(self) -> None:
        self.times.append(time.monotonic())
        self.threads.add(threading.get_ident())
        self._arrived.set()

    async def next(self, timeout: float = 1.0) -> float:
        """The time of the next call; fails when none comes within ``timeout``."""
        count = len(self.times)
        deadline = time.monotonic() + timeout
        while len(self.times) == count:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no on_change call within {timeout} s")
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.times[count]

    async def none_within(self, seconds: float = QUIET) -> None:
        count = len(self.times)
        await asyncio.sleep(seconds)
        assert self.times[count:] == [], "an ignored change called on_change"


Body = Callable[[CatalogWatcher, Calls], Awaitable[None]]


def watch(catalog: Path, body: Body, extra: Callable[[], set[Path]] | None = None) -> Calls:
    """Run ``body`` against a started watcher on a fresh loop; the calls it saw."""

    async def main() -> Calls:
        calls = Calls()
        watcher = CatalogWatcher(catalog, calls, asyncio.get_running_loop(), extra_directories=extra)
        watcher.start()
        try:
            await body(watcher, calls)
        finally:
            watcher.stop()
        assert calls.threads <= {threading.get_ident()}, "on_change ran off the event loop"
        return calls

    return asyncio.run(main())


def write(path: Path, text: str = "") -> None:
    path.write_text(text or MANIFEST.format(id=path.stem))


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "models.d"
    path.mkdir()
    write(path / "existing.toml")
    return path


def test_rename_into_place_triggers_once_within_a_second(catalog: Path) -> None:
    latencies: list[float] = []

    async def body(watcher: CatalogWatcher, calls: Calls) -> None:
        write(catalog / "x.toml.tmp")  # the temporary itself does not count
        await calls.none_within()
        started = time.monotonic()
        os.rename(catalog / "x.toml.tmp", catalog / "x.toml")
        latencies.append(await calls.next() - started)
        await calls.none_within(SETTLE)

    calls = watch(catalog, body)
    assert len(calls.times) == 1
    assert latencies[0] < 1.0
    print(f"rename -> on_change latency: {latencies[0] * 1e3:.0f} ms")


def test_a_burst_of_writes_is_one_call_after_it(catalog: Path) -> None:
    async def body(watcher: CatalogWatcher, calls: Calls) -> None:
        text = MANIFEST.format(id="big") + "".join(f"# padding line {i}\n" for i in range(200))
        piece = len(text) // 20 + 1
        with open(catalog / "big.toml", "w") as file:  # like cp: many writes, each one event
            for start in range(0, len(text), piece):
                file.write(text[start : start + piece])
                file.flush()
                await asyncio.sleep(0.01)
        burst_end = time.monotonic()
        assert await calls.next() >= burst_end, "called before the burst settled"
        await asyncio.sleep(SETTLE)
        assert len(calls.times) <= 2

        before = len(calls.times)
        for i in range(10):  # many manifests at once
            write(catalog / f"m{i}.toml")
        burst_end = time.monotonic()
        assert await calls.next() >= burst_end
        await asyncio.sleep(SETTLE)
        assert len(calls.times) - before <= 2

    watch(catalog, body)


def test_editor_and_package_manager_temporaries_are_ignored(catalog: Path) -> None:
    async def body(watcher: CatalogWatcher, calls: Calls) -> None:
        for name in (".x.toml.swp", "x.toml~", "x.toml.dpkg-new", "x.toml.dpkg-old", "notes.txt", "4913", ".hidden.toml"):
            write(catalog / name)
            (catalog / name).unlink()
        write(catalog / "x.toml.dpkg-dist")
        (catalog / "subdir").mkdir()
        os.rename(catalog / "x.toml.dpkg-dist", catalog / "x.toml.ucf-old")
        await calls.none_within()

    assert watch(catalog, body).times == []


def test_deleting_or_editing_a_manifest_triggers(catalog: Path) -> None:
    async def body(watcher: CatalogWatcher, calls: Calls) -> None:
        (catalog / "existing.toml").unlink()
        await calls.next()
        write(catalog / "other.toml")
        await calls.next()
        with open(catalog / "other.toml", "a") as file:
            file.write("# edited in place\n")
        await calls.next()

    assert len(watch(catalog, body).times) == 3


def test_model_directories_are_watched_and_resynced_after_each_call(catalog: Path, tmp_path: Path) -> None:
    old, new, missing = tmp_path / "models" / "old", tmp_path / "models" / "new", tmp_path / "models" / "gone"
    old.mkdir(parents=True)
    new.mkdir()
    extra = {old, missing}  # a missing directory is skipped, not an error

    async def body(watcher: CatalogWatcher, calls: Calls) -> None:
        assert watcher.directories == {catalog, old}
        write(old / "model.onnx", "weights")  # any file counts in a model directory
        await calls.next()
        write(old / "tokenizer.json.tmp", "{}")  # temporaries do not
        write(old / ".model.onnx.swp", "x")
        await calls.none_within()
        os.rename(old / "tokenizer.json.tmp", old / "tokenizer.json")  # their rename into place does
        await calls.next()

        extra.clear()
        extra.add(new)  # the manifests now point elsewhere; the next call re-syncs the watches
        write(catalog / "existing.toml", MANIFEST.format(id="existing") + "# moved\n")
        await calls.next()
        assert watcher.directories == {catalog, new}
        write(old / "model.onnx", "stale")
        await calls.none_within()
        write(new / "model.onnx", "weights")
        await calls.next()

    watch(catalog, body, extra=lambda: set(extra))


def test_a_missing_catalog_is_watched_for(tmp_path: Path) -> None:
    catalog = tmp_path / "models.d"

    async def body(watcher: CatalogWatcher, calls: Calls) -> None:
        assert watcher.directories == {tmp_path}
        catalog.mkdir()
        await calls.next()
        await asyncio.sleep(SETTLE)  # the rescan after the catalog's own watch is in place
        assert watcher.directories == {catalog}
        count = len(calls.times)
        write(catalog / "x.toml")
        await calls.next()
        assert len(calls.times) == count + 1

    watch(catalog, body)


def test_a_deleted_and_recreated_catalog_is_watched_again(catalog: Path) -> None:
    async def body(watcher: CatalogWatcher, calls: Calls) -> None:
        (catalog / "existing.toml").unlink()
        catalog.rmdir()
        await calls.next()  # the parent is watched once this call's sync has run
        catalog.mkdir()
        await calls.next()
        await asyncio.sleep(SETTLE)  # the rescan after the catalog's own watch is in place
        write(catalog / "x.toml")
        await calls.next()

    watch(catalog, body)


def test_stop_is_idempotent_and_leaves_no_threads(catalog: Path) -> None:
    before = set(threading.enumerate())

    async def main() -> None:
        calls = Calls()
        watcher = CatalogWatcher(catalog, calls, asyncio.get_running_loop())
        watcher.stop()  # before start: nothing to do
        watcher.start()
        watcher.start()
        write(catalog / "pending.toml")  # a call still pending in the debounce is dropped
        await asyncio.sleep(0.05)
        watcher.stop()
        watcher.stop()
        write(catalog / "late.toml")
        await calls.none_within()
        assert calls.times == []

    asyncio.run(main())
    assert set(threading.enumerate()) - before == set()


@pytest.mark.parametrize(
    ("name", "temporary"),
    [
        ("x.toml", False),
        ("model.onnx", False),
        ("model.onnx.data", False),
        (".x.toml.swp", True),
        ("x.toml~", True),
        ("x.toml.dpkg-new", True),
        ("x.toml.dpkg-old", True),
        ("x.toml.dpkg-dist", True),
        ("4913", True),
        (".hidden", True),
        ("model.onnx.part", True),
    ],
)
def test_temporary_names(name: str, temporary: bool) -> None:
    assert is_temporary(name) is temporary
