"""Command-line front-ends to the client: ``embed``, ``models`` and ``status``.

These talk to a running daemon through akidb_embed_client only, so they work from any
machine user that can open the socket.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from akidb_embed_client import Client, EmbedError, Embeddings, Unavailable

TEXT_WIDTH = 40
SHOWN_COMPONENTS = 4
EXIT_ERROR = 2
EXIT_UNAVAILABLE = 3

Command = Callable[[argparse.Namespace], int]


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``embed``, ``models`` and ``status`` on an argparse subparsers object."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--socket", metavar="PATH", help="daemon socket (default: $AKIDB_EMBED_SOCKET or /run/akidb-embed/embed.sock)"
    )
    connection.add_argument(
        "--timeout", metavar="S", type=float, default=10.0, help="seconds to wait for each try (default: 10)"
    )
    connection.add_argument("--json", action="store_true", help="print JSON instead of a table")

    embed = subparsers.add_parser("embed", parents=[connection], help="embed texts with the running daemon")
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed")
    embed.add_argument("--model", metavar="M", help="model id (default: the daemon's default model)")
    embed.add_argument("--prompt", metavar="P", help="prompt name from the manifest, or a literal prefix")
    embed.add_argument("--dimensions", metavar="N", type=int, help="truncate to N dimensions (Matryoshka models)")
    embed.add_argument(
        "--no-normalize", dest="normalize", action="store_const", const=False, help="return unnormalized vectors"
    )
    embed.add_argument(
        "--no-truncate", dest="truncate", action="store_const", const=False,
        help="fail on inputs longer than the model's max_length instead of cutting them",
    )
    embed.set_defaults(func=embed_command)

    models = subparsers.add_parser("models", parents=[connection], help="list the daemon's models and their state")
    models.set_defaults(func=models_command)

    status = subparsers.add_parser("status", parents=[connection], help="show the daemon's status")
    status.set_defaults(func=status_command)


def _exit_codes(command: Command) -> Command:
    """Turn daemon and connection errors into a one-line message and an exit code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except EmbedError as exc:
            print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
            return EXIT_UNAVAILABLE if isinstance(exc, Unavailable) else EXIT_ERROR

    return run


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket, timeout=args.timeout)


@_exit_codes
def embed_command(args: argparse.Namespace) -> int:
    """Embed the texts and print a table, plus a similarity matrix for two or more."""
    with _client(args) as client:
        vectors = client.embed(
            args.texts,
            args.model,
            normalize=args.normalize,
            truncate=args.truncate,
            prompt=args.prompt,
            dimensions=args.dimensions,
        )
    if args.json:
        print(json.dumps(embeddings_json(args.texts, vectors), indent=2))
        return 0
    print(embeddings_table(args.texts, vectors))
    if len(args.texts) > 1:
        print()
        print("cosine similarity")
        print(similarity_table(vectors))
    return 0


@_exit_codes
def models_command(args: argparse.Namespace) -> int:
    """Print every model in the catalog with its state."""
    with _client(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    headers = ["id", "state", "dimension", "pooling", "max_length", "default", "error"]
    rows = [
        [
            str(m.get("id", "")),
            str(m.get("state", "")),
            str(m.get("dimension", "")),
            str(m.get("pooling", "")),
            str(m.get("max_length", "")),
            "*" if m.get("default") else "",
            m.get("error") or "",
        ]
        for m in models
    ]
    print(table(headers, rows) if rows else "no models in the catalog")
    return 0


@_exit_codes
def status_command(args: argparse.Namespace) -> int:
    """Print the daemon's status as aligned key/value lines."""
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    pairs = flatten(status)
    width = max((len(key) for key, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key:<{width}}  {_scalar(value)}")
    return 0


def embeddings_json(texts: Sequence[str], vectors: Embeddings) -> dict[str, Any]:
    """The embed result as plain JSON data, vectors as lists."""
    tokens = vectors.tokens or [None] * len(texts)
    return {
        "model": vectors.model,
        "fingerprint": vectors.fingerprint,
        "dimension": vectors.dimension,
        "embeddings": [
            {"text": text, "tokens": count, "vector": row.tolist()}
            for text, count, row in zip(texts, tokens, np.asarray(vectors))
        ],
    }


def embeddings_table(texts: Sequence[str], vectors: Embeddings) -> str:
    """One row per text: the text, model, dimension, tokens, leading components and norm."""
    tokens = vectors.tokens or [None] * len(texts)
    rows = []
    for index, (text, count, row) in enumerate(zip(texts, tokens, np.asarray(vectors))):
        head = " ".join(f"{x:+.4f}" for x in row[:SHOWN_COMPONENTS])
        more = " ..." if row.size > SHOWN_COMPONENTS else ""
        rows.append([
            str(index),
            shorten(text),
            str(vectors.model),
            str(vectors.dimension if vectors.dimension is not None else row.size),
            "" if count is None else str(count),
            f"[{head}{more}]",
            f"{np.linalg.norm(row):.4f}",
        ])
    return table(["#", "text", "model", "dim", "tokens", "vector", "norm"], rows)


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


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned fixed-width columns separated by two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def shorten(text: str, width: int = TEXT_WIDTH) -> str:
    """The text on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


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


def _scalar(value: Any) -> str:
    if value is None or value == {}:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_scalar(item) for item in value) or "-"
    return str(value)
