"""How the command line shows what ``embed`` and ``status`` return (models and profiles: modeltable.py).

Each function turns one reply into the text the command prints: tables for people, or with
``--json``, plain JSON data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from akidb_embed_client import Embeddings

from .modeltable import MIB, human_bytes, scalar, table

TEXT_WIDTH = 40
SHOWN_COMPONENTS = 4
# status shows memory first, these in this order; the rest follow in the daemon's order
STATUS_FIRST = ("memory.source", "memory.pressure", "memory.used", "memory.available", "memory.total")
BYTE_FIELDS = {"total", "available", "used", "own_rss", "swap_used", "swap_total"}


def embeddings_table(texts: Sequence[str], vectors: Embeddings) -> str:
    """One row per text: the text, model, dimension, tokens, leading components and norm."""
    tokens = vectors.tokens or [None] * len(texts)
    rows = []
    for index, (text, count, row) in enumerate(zip(texts, tokens, np.asarray(vectors))):
        head = " ".join(f"{x:+.4f}" for x in row[:SHOWN_COMPONENTS])
        more = " ..." if row.size > SHOWN_COMPONENTS else ""
        dimension = vectors.dimension if vectors.dimension is not None else row.size
        rows.append([
            str(index), shorten(text), str(vectors.model), str(dimension), "" if count is None else str(count),
            f"[{head}{more}]", f"{np.linalg.norm(row):.4f}",
        ])
    return table(["#", "text", "model", "dim", "tokens", "vector", "norm"], rows)


def choice_lines(vectors: Embeddings) -> list[str]:
    """What the daemon chose for the request, if it chose: the auto model, a fallback."""
    lines = []
    if vectors.auto is not None:
        auto = vectors.auto
        lines.append(f"auto: {vectors.model} (fingerprint {vectors.fingerprint}), judged on its {auto['judged_on']}"
                     + (f", prompt {auto['prompt']}" if auto.get("prompt") else ""))  # fmt: skip
    if vectors.fallback is not None:
        fallback = vectors.fallback
        lines.append(f"fallback: {vectors.model} served for {fallback['requested']} ({fallback['reason']}: "
                     f"{fallback['message']})")  # fmt: skip
    return lines


def similarity_table(vectors: np.ndarray) -> str:
    """The cosine similarity of every pair of rows, as a table indexed like the texts."""
    matrix = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # A zero vector has no direction; leave its similarities at zero instead of dividing by 0.
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    cosine = unit @ unit.T
    headers = [""] + [str(i) for i in range(len(cosine))]
    rows = [[str(i)] + [f"{x:+.4f}" for x in line] for i, line in enumerate(cosine)]
    return table(headers, rows)


def embeddings_json(texts: Sequence[str], vectors: Embeddings) -> dict[str, Any]:
    """The embed result as plain JSON data, vectors as lists."""
    tokens = vectors.tokens or [None] * len(texts)
    return {
        "model": vectors.model, "fingerprint": vectors.fingerprint, "dimension": vectors.dimension,
        "embeddings": [
            {"text": text, "tokens": count, "vector": row.tolist()}
            for text, count, row in zip(texts, tokens, np.asarray(vectors))
        ],
    }


def shorten(text: str, width: int = TEXT_WIDTH) -> str:
    """The text on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def status_lines(status: dict[str, Any]) -> str:
    """Aligned key/value lines: memory first (source, pressure, sizes), then the rest."""
    pairs = dict(flatten(status))
    keys = sorted(pairs, key=lambda key: (key.split(".")[0] != "memory", (*STATUS_FIRST, key).index(key)))
    width = max((len(key) for key in keys), default=0)
    return "\n".join(f"{key:<{width}}  {status_value(key, pairs[key])}" for key in keys)


def status_value(key: str, value: Any) -> str:
    """A status value in human units: bytes and MB as MiB/GiB, fractions as percentages."""
    name = key.rsplit(".", 1)[-1]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return scalar(value)
    if key.startswith("memory.") and name in BYTE_FIELDS:
        return human_bytes(value)
    if name.endswith("_mb"):
        return human_bytes(value * MIB)
    if (name == "pressure" or name.endswith("_watermark")) and 0 <= value <= 1:
        return f"{value * 100:.1f}%"
    return str(value)


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys, e.g. ``{"models": {"ready": 2}}`` → ``models.ready``."""
    pairs: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            pairs.extend(flatten(value, f"{name}."))
        else:
            pairs.append((name, value))
    return pairs
