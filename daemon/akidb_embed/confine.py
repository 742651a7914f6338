"""Model roots: every file a manifest names must resolve, symlinks followed, under one of them.

A manifest is data written by whoever may write the catalog, but the daemon opens the files it
names with the daemon's own rights, maps them into memory and serves from them. Unconfined, a
manifest could have it read any file it can (``model = "/etc/shadow"``, a ``../../`` path, a
symlink planted in a model folder). ``check`` judges a manifest from its paths alone: it resolves
each one (``os.path.realpath``: lstat and readlink of the path's parts, never an open) and
compares the result with the resolved roots. A file outside is never opened, read or hashed, and
its manifest is refused (the catalog lists it ``invalid``, naming the file, where it resolves to
and the roots). The loader checks again before it opens anything, in case a file was swapped for
a symlink after the catalog's scan.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .manifest import Manifest, ManifestError, model_files


def check(manifest: Manifest, roots: Iterable[Path]) -> None:
    """Raise ``ManifestError`` naming the first file of ``manifest`` that resolves outside every root."""
    roots = list(roots)
    named = {"model": manifest.model, "tokenizer": manifest.tokenizer}
    if manifest.golden is not None:
        named["[golden] file"] = manifest.golden.path
    for field, path in named.items():
        check_file(path, f"{manifest.path}: {field}", roots)
    # Listed only now that the graph is known to be confined: external-data files beside it (model.onnx.data).
    for path in model_files(manifest)[1:-1]:
        check_file(path, f"{manifest.path}: external data", roots)


def check_file(path: Path, what: str, roots: Iterable[Path]) -> None:
    """Raise ``ManifestError`` (``what`` says whose file) unless ``path`` resolves under one of ``roots``."""
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(root) for root in real_roots):
        return
    where = f"resolves to {real}" if real != path else "is"
    raise ManifestError(
        f"{what} {path} {where} outside the model roots ({', '.join(map(str, real_roots))}); refused, the daemon "
        "does not open it. Move the file under one of the roots, or add its folder to model_roots in the daemon's "
        "config (akidb-embed.toml) and restart the daemon"
    )
