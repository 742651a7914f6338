"""What a process holds, read from /proc: resident memory and open file descriptors (tests and scripts)."""

from __future__ import annotations

import os
from pathlib import Path

import tinymodels


def rss_kib(pid: int) -> int:
    """The process's resident set size (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KeyError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors the process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def two_model_catalog(root: Path) -> Path:
    """A catalog of the tiny encoder (bge-tiny, the default) and decoder (qwen3-tiny), built under ``root``."""
    tinymodels.build_encoder(root / "encoder")
    tinymodels.build_decoder(root / "decoder")
    catalog = root / "models.d"
    tinymodels.write_manifest(catalog, "bge-tiny", root / "encoder", **tinymodels.BGE_FIELDS, default=True)
    tinymodels.write_manifest(catalog, "qwen3-tiny", root / "decoder", **tinymodels.QWEN3_FIELDS)
    return catalog
