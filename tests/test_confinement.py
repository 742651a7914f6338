"""Confined manifests: files outside the model roots are refused unopened; absurd files are refused unread.

Proof that the daemon never opened a file: the test runs as root, for which no file mode is a
barrier, so the files outside the roots are mode 0 (a daemon running as akidb-embed could not
read them) and inotify watches their folder for opens by anyone. The same watch on a folder
inside the roots sees the daemon open the files of the model it does load, so a silent watch
means no open, not a blind one. A FIFO is a second witness: opening it would block, and a
non-blocking open for writing fails with ENXIO while no one holds it open for reading.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinymodels
from akidb_embed.confine import check
from akidb_embed.filesize import MAX_TOKENIZER_BYTES, FileRefused, read_bounded
from akidb_embed.manifest import ManifestError, load_manifest
from akidb_embed.settings import DEFAULT_MODEL_ROOTS, Settings, SettingsError, load_settings
from akidb_embed_client import errors
from daemon_process import Daemon, run_daemon, wait_for
from watchdog.events import FileOpenedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

GIB = 1 << 30
ESCAPES = ("absolute", "dotdot", "symlinked-file", "symlinked-manifest", "golden-fifo")


class Opens(FileSystemEventHandler):
    """Every file opened in the watched folders, by any process."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self._lock:
            self.paths.append(str(event.src_path))

    def under(self, folder: Path) -> list[str]:
        with self._lock:
            return [p for p in self.paths if Path(p).parent == folder]


@pytest.fixture
def opens() -> Iterator[tuple[Opens, Observer]]:
    handler, observer = Opens(), Observer()
    observer.start()
    yield handler, observer
    observer.stop()
    observer.join()


def watch(opens: tuple[Opens, Observer], *folders: Path) -> Opens:
    handler, observer = opens
    for folder in folders:
        observer.schedule(handler, str(folder), event_filter=[FileOpenedEvent])
    time.sleep(0.1)  # the inotify watches are added by the observer's threads
    return handler


def models(daemon: Daemon) -> dict[str, dict]:
    with daemon.client() as client:
        return {m["id"]: m for m in client.models()}


def peak_rss(daemon: Daemon) -> int:
    """The daemon's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def layout(tmp_path: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    """A model root with a good encoder, a folder outside it with unreadable copies and a FIFO, and a catalog."""
    root, outside, catalog = tmp_path / "root", tmp_path / "outside", tmp_path / "etc" / "models.d"
    shutil.copytree(tiny_models["encoder"], root / "encoder")
    shutil.copytree(tiny_models["encoder"], outside)
    (root / "linked").mkdir()
    shutil.copy(root / "encoder" / tinymodels.TOKENIZER_FILE, root / "linked")
    (root / "linked" / tinymodels.MODEL_FILE).symlink_to(outside / tinymodels.MODEL_FILE)
    os.mkfifo(outside / "golden.npz")
    fields = tinymodels.BGE_FIELDS
    tinymodels.write_manifest(catalog, "good", root / "encoder", **fields)
    tinymodels.write_manifest(catalog, "absolute", root / "encoder", **fields, model=str(outside / tinymodels.MODEL_FILE))
    tinymodels.write_manifest(catalog, "dotdot", root / "encoder", **fields, tokenizer="../../outside/tokenizer.json")
    # Absolute, so the manifest keeps the symlink's own path (relative ones are resolved as they are read).
    tinymodels.write_manifest(catalog, "symlinked-file", root / "linked", **fields, model=str(root / "linked" / "model.onnx"))
    tinymodels.write_manifest(catalog, "golden-fifo", root / "encoder", outside / "golden.npz", **fields)
    # A manifest outside, naming good files, linked into the catalog.
    tinymodels.write_manifest(outside, "symlinked-manifest", root / "encoder", **fields)
    (catalog / "symlinked-manifest.toml").symlink_to(outside / "symlinked-manifest.toml")
    for path in outside.iterdir():
        path.chmod(0)
    return {"root": root, "outside": outside, "catalog": catalog}


def assert_never_opened(opens: Opens, outside: Path) -> None:
    assert opens.under(outside) == []
    with pytest.raises(OSError) as caught:  # ENXIO: no reader holds the FIFO, not even one blocked in open()
        os.close(os.open(outside / "golden.npz", os.O_WRONLY | os.O_NONBLOCK))
    assert caught.value.errno == errno.ENXIO


def test_manifests_escaping_the_roots_are_refused_and_their_files_never_opened(
    layout: dict[str, Path], opens: tuple[Opens, Observer]
) -> None:
    """1. manifests naming files outside the root: absolute, ../../, a symlinked file, a symlinked manifest, a FIFO
    2. each is invalid, its error naming the file, where it resolves and the roots  3. load, embed and a rescan
    open nothing outside  4. the good model serves, and the watch sees its files opened."""
    root, outside = layout["root"], layout["outside"]
    watcher = watch(opens, outside, root / "encoder")
    with run_daemon(layout["catalog"], model_roots=[str(root)]) as daemon:
        listed = models(daemon)
        assert listed["good"]["state"] == "available"
        for model_id in ESCAPES:
            error = listed[model_id]["error"]
            assert listed[model_id]["state"] == "invalid", (model_id, listed[model_id])
            assert "outside the model roots" in error and str(outside) in error, error
            assert str(root) in error and str(layout["catalog"]) in error and "model_roots" in error, error
        assert "resolves to" in listed["symlinked-file"]["error"]
        assert "[golden] file" in listed["golden-fifo"]["error"]
        with daemon.client() as client:
            for model_id in ESCAPES:
                with pytest.raises(errors.ModelUnavailable):
                    client.load(model_id)
                with pytest.raises(errors.ModelUnavailable):
                    client.embed(["hello"], model=model_id)
            daemon.signal(signal.SIGHUP)  # a full rescan reads every manifest again
            assert client.embed(["the good one serves"], model="good").model == "good"
        wait_for(lambda: watcher.under(root / "encoder"))  # the watch sees the daemon's opens
        time.sleep(0.3)  # events from the same moments have arrived too
        assert_never_opened(watcher, outside)
        assert daemon.alive() and "Traceback" not in daemon.log()


def test_a_file_swapped_for_a_symlink_after_the_scan_is_refused_at_load(
    layout: dict[str, Path], opens: tuple[Opens, Observer]
) -> None:
    """1. a valid model, not loaded  2. its graph replaced by a symlink out  3. the rescan keeps the old manifest
    but the load checks again: refused, the target never opened."""
    root, outside = layout["root"], layout["outside"]
    watcher = watch(opens, outside)
    with run_daemon(layout["catalog"], model_roots=[str(root)]) as daemon:
        graph = root / "encoder" / tinymodels.MODEL_FILE
        link = graph.with_name(".swap")
        link.symlink_to(outside / tinymodels.MODEL_FILE)
        os.replace(link, graph)
        wait_for(lambda: models(daemon)["good"]["update_error"])
        assert "outside the model roots" in models(daemon)["good"]["update_error"]
        with daemon.client() as client, pytest.raises(errors.ModelUnavailable) as caught:
            client.load("good")
        assert "outside the model roots" in str(caught.value) and str(outside) in str(caught.value)
        time.sleep(0.3)
        assert_never_opened(watcher, outside)


def test_absurd_files_are_refused_unread(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """1. a 2 GiB manifest, a FIFO named like a manifest, a model whose tokenizer.json is 1 GiB (sparse files)
    2. the manifest and FIFO are invalid, the load refused, each naming the bound  3. the daemon never held
    anything near the sizes (peak RSS) and serves the good model."""
    catalog, big = tmp_path / "models.d", tmp_path / "big"
    tinymodels.write_manifest(catalog, "good", tiny_models["encoder"], **tinymodels.BGE_FIELDS)
    with open(catalog / "huge.toml", "wb") as f:
        f.truncate(2 * GIB)
    os.mkfifo(catalog / "pipe.toml")
    shutil.copytree(tiny_models["encoder"], big)
    os.truncate(big / tinymodels.TOKENIZER_FILE, GIB)
    tinymodels.write_manifest(catalog, "big-tokenizer", big, **tinymodels.BGE_FIELDS)
    with run_daemon(catalog) as daemon, daemon.client() as client:
        listed = models(daemon)
        assert listed["huge"]["state"] == "invalid"
        assert "2048.0 MiB, over the 1.0 MiB a manifest may be" in listed["huge"]["error"]
        assert listed["pipe"]["state"] == "invalid" and "not a regular file" in listed["pipe"]["error"]
        with pytest.raises(errors.ModelUnavailable) as caught:
            client.load("big-tokenizer")
        assert "1024.0 MiB, over the 64.0 MiB a tokenizer.json may be" in str(caught.value)
        assert client.embed(["still serving"], model="good").model == "good"
        assert peak_rss(daemon) < GIB // 2, peak_rss(daemon)


# --- units ----------------------------------------------------------------------------------------


def test_read_bounded_takes_a_file_at_the_bound_and_refuses_one_byte_more(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"x" * 1000)
    assert read_bounded(path, 1000, "tokenizer.json") == b"x" * 1000
    with pytest.raises(FileRefused, match="1000 bytes, over the 999 bytes a tokenizer.json may be"):
        read_bounded(path, 999, "tokenizer.json")
    os.truncate(path, MAX_TOKENIZER_BYTES + 1)
    with pytest.raises(FileRefused, match="64.0 MiB, over"):
        read_bounded(path, MAX_TOKENIZER_BYTES, "tokenizer.json")


def test_roots_compare_resolved_paths_by_component(tmp_path: Path) -> None:
    """A root reached by a symlink still holds its files; a sibling whose name only starts like a root does not;
    an external-data file beside the graph is checked like the graph."""
    real, near = tmp_path / "models", tmp_path / "models-evil"
    for folder in (real, near):
        folder.mkdir()
        for name in ("model.onnx", "tokenizer.json"):
            (folder / name).write_bytes(b"")
    (tmp_path / "via-link").symlink_to(real)
    catalog = tmp_path / "catalog"
    inside = load_manifest(tinymodels.write_manifest(catalog, "inside", real, **tinymodels.BGE_FIELDS))
    check(inside, [tmp_path / "via-link"])
    sibling = load_manifest(tinymodels.write_manifest(catalog, "sibling", near, **tinymodels.BGE_FIELDS))
    with pytest.raises(ManifestError, match="models-evil/model.onnx is outside the model roots"):
        check(sibling, [real])
    (real / "model.onnx.data").symlink_to(near / "model.onnx")
    with pytest.raises(ManifestError, match="external data .*model.onnx.data resolves to .*models-evil"):
        check(inside, [real])


def test_model_roots_setting(tmp_path: Path) -> None:
    """Defaults plus the catalog; a config's list replaces the defaults; relative or non-string roots are errors."""
    assert Settings().all_model_roots == (*DEFAULT_MODEL_ROOTS, Path("/etc/akidb-embed/models.d"))
    config = tmp_path / "akidb-embed.toml"
    config.write_text('model_roots = ["/srv/models"]\ncatalog = "/srv/models.d"\n')
    assert load_settings(config).all_model_roots == (Path("/srv/models"), Path("/srv/models.d"))
    for bad, message in (('["models"]', "must be absolute"), ("[1]", "list of paths"), ('"/srv"', "must be a list")):
        config.write_text(f"model_roots = {bad}\n")
        with pytest.raises(SettingsError, match=message):
            load_settings(config)
