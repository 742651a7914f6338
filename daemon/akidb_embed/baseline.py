"""sentence-transformers beside the daemon, for ``bench --plot``: the model a daemon model was converted from,
measured in this process on the texts and batch size the daemon's bench used.

The source of a daemon model is its manifest's ``[conversion] source`` (``convert`` records it). The manifest
is read from the path the ``models`` reply gives, so this works where the daemon runs, which a Unix socket
implies. sentence-transformers and torch are imported only when a source was found.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from .manifest import ManifestError, load_manifest

MODULE = "sentence_transformers"


def installed() -> bool:
    """Whether sentence-transformers can be imported (located, not imported: that takes seconds)."""
    return importlib.util.find_spec(MODULE) is not None


def source_of(model: dict[str, Any]) -> tuple[Path | None, str]:
    """The sentence-transformers folder a model (its ``models`` entry) was converted from, or None and why not."""
    try:
        manifest = load_manifest(Path(model["path"]))
    except (KeyError, ManifestError) as exc:
        return None, f"its manifest cannot be read ({exc})"
    if manifest.conversion is None:
        return None, f"{manifest.path} has no [conversion] source (it was not made by akidb-embed convert)"
    source = manifest.conversion.source
    if not (source / "config.json").is_file():
        return None, f"its source {source} holds no model (no config.json)"
    return source, ""


def texts_per_s(folder: Path, texts: list[str], seconds: float, rounds: int) -> float:
    """Texts per second of sentence-transformers ``encode`` on the CPU, one batch of ``texts`` a call, timed as the
    daemon's bench times its batches: at least ``rounds`` calls and ``seconds``, after one warm-up call."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bar
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    model.encode(texts, batch_size=len(texts), show_progress_bar=False)  # the daemon's model is warm too
    done, started = 0, time.perf_counter()
    while done < rounds or time.perf_counter() - started < seconds:
        model.encode(texts, batch_size=len(texts), show_progress_bar=False)
        done += 1
    return done * len(texts) / (time.perf_counter() - started)
