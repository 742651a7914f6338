"""The cache folder, checked at start: one the daemon cannot write is said in one line, with the
cause and the fix, and the daemon serves anyway (only TensorRT keeps anything there; the CPU path
needs nothing from it). The state folder is the state store's to check (``state``)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def check_cache_dir(path: Path) -> None:
    """Log a warning unless a file can be made in ``path`` (made if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        log.warning("cache_dir %s cannot be used (%s): TensorRT engines are built again at every load. Fix: make it "
                    "a folder the daemon's user can write, or set cache_dir to one", path, exc)  # fmt: skip
