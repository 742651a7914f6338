"""Size bounds on the files the daemon reads whole into memory to parse: manifests and tokenizer.json.

An absurd file (a manifest of gigabytes, a tokenizer.json that a runaway download filled) is refused
from ``stat`` before a byte of it is read, so it cannot fill the daemon's memory; the read itself
stops one byte past the bound, so a file that grows after the ``stat`` is refused the same way. A
FIFO or device under the name is refused too: reading one could block or never end.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MIB = 1 << 20
MAX_MANIFEST_BYTES = 1 * MIB  # real manifests are 1 to 4 KiB
# Real tokenizer.json files: MiniLM 0.7 MB, Qwen3 11 MB, multilingual ones (XLM-R, Gemma 3) up to ~33 MB.
MAX_TOKENIZER_BYTES = 64 * MIB


class FileRefused(ValueError):
    """A file not read because of its size or type; the message says which bound it broke."""


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The content of the regular file ``path`` if it holds at most ``limit`` bytes (OSError if it cannot be read)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise FileRefused(f"{path} is not a regular file; a {what} must be one")
    _check_size(path, info.st_size, limit, what)
    # O_NONBLOCK: a FIFO swapped in since the stat fails the read instead of hanging the daemon.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    _check_size(path, len(data), limit, what)
    return data


def _check_size(path: Path, size: int, limit: int, what: str) -> None:
    if size > limit:
        raise FileRefused(
            f"{path} is {_amount(size)}, over the {_amount(limit)} a {what} may be: not read. "
            f"Is it the right file? (a real {what} is far smaller)"
        )


def _amount(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size} bytes"
