"""Command-line front-ends to the client: embed, models, status, load, unload, pin, unpin, and events.

These talk to a running daemon through akidb_embed_client only, so they work from any
machine user that can open the socket. Here: the arguments and the calls; the text they
print comes from display.py (embed, status) and modeltable.py (models, bench, load and the like).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from typing import Any

from akidb_embed_client import AUTO_MODEL, KEEP_ALIVE_FOREVER, Client, EmbedError, Unavailable

from . import chart, eventlog, top
from .display import choice_lines, embeddings_json, embeddings_table, similarity_table, status_lines
from .modeltable import fits_table, model_summary, models_table, profiles_table

EXIT_ERROR = 2
EXIT_UNAVAILABLE = 3
DEFAULT_TIMEOUT = 10.0
LOAD_TIMEOUT = 120.0  # load answers once the model is loaded: minutes for a large one
BENCH_TIMEOUT = 600.0  # bench answers once measured: a load, then seconds of timing
MODEL_OPS = {
    "load": "load a model now (answers once it is loaded)",
    "unload": "unload a model (it loads again on its next use)",
    "pin": "keep a model loaded until unpinned",
    "unpin": "let the daemon unload a pinned model again",
    "tune": "measure a model's threads and batch cut again on this machine and reload it with them",
}


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the client commands on an argparse subparsers object."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--socket", metavar="PATH", help="daemon socket (default: $AKIDB_EMBED_SOCKET or /run/akidb-embed/embed.sock)"
    )
    connection.add_argument(
        "--timeout", metavar="S", type=float,
        help=f"seconds to wait for each try (default: {DEFAULT_TIMEOUT:g}; {LOAD_TIMEOUT:g} for load and tune)",
    )
    connection.add_argument("--json", action="store_true", help="print JSON instead of a table")
    keeping = argparse.ArgumentParser(add_help=False)
    keeping.add_argument(
        "--keep-alive", metavar="S", type=seconds,
        help="keep the model loaded S seconds after its last use (30, 5m, 2h; forever or negative: until unloaded)",
    )

    constraining = argparse.ArgumentParser(add_help=False)  # what model "auto" must meet (docs/protocol.md)
    constraining.add_argument("--max-latency", metavar="MS", type=float, help="single-text p95 in ms, a cold load included")
    constraining.add_argument("--languages", metavar="L,L", type=_languages, help="languages every one of which it covers")
    constraining.add_argument("--max-memory", metavar="MB", type=float, help="the memory it may take")
    constraining.add_argument("--task", choices=("query", "passage", "symmetric"), help="picks the model's prompt")
    constraining.add_argument("--prefer", choices=("quality", "speed", "memory"), help="the order among models that fit")

    embed = subparsers.add_parser(
        "embed", parents=[connection, keeping, constraining], help="embed texts with the running daemon"
    )
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed")
    embed.add_argument("--model", metavar="M", help="model id (default: the daemon's default model)")
    embed.add_argument("--auto", action="store_true",
                       help="let the daemon choose by --max-latency, --languages, --dimensions, --max-memory, --task")
    embed.add_argument("--expect-fingerprint", metavar="F", help="fail (model_changed) if another model version serves")
    embed.add_argument("--allow-fallback", action="store_true", default=None,
                       help="let the model's fallback serve if it failed, is overloaded or does not fit")
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

    models = subparsers.add_parser(
        "models", parents=[connection, constraining], help="list the daemon's models and their state"
    )
    models.add_argument("--wide", action="store_true", help="every column: memory parts, live figures, the profile")
    models.add_argument("--fits", action="store_true",
                        help="only the models that meet the constraints, best first, and why the others do not")
    models.add_argument("--dimensions", metavar="N", type=int, help="with --fits: the dimension they must give")
    models.set_defaults(func=models_command)

    bench = subparsers.add_parser(
        "bench", parents=[connection], help="measure models' latency, throughput, memory and quality on this device"
    )
    bench.add_argument("models", nargs="*", metavar="MODEL", help="model ids (default: every enabled model)")
    bench.add_argument("--texts", type=int, metavar="N", help="single-text requests to time (default: 100)")
    bench.add_argument("--plot", metavar="FILE", type=chart.plot_file, help=chart.HELP)
    bench.set_defaults(func=bench_command)

    status = subparsers.add_parser("status", parents=[connection], help="show the daemon's status")
    status.set_defaults(func=status_command)

    top = subparsers.add_parser("top", help="a live view of the daemon: memory, and per model state, QPS, p95, queue")
    top.add_argument("--socket", metavar="PATH", help="daemon socket (default: as for the other commands)")
    top.add_argument("--interval", metavar="S", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame as text and exit")
    top.set_defaults(func=top_command)

    eventlog.add_parser(subparsers)

    for op, text in MODEL_OPS.items():
        command = subparsers.add_parser(op, parents=[connection, keeping] if op == "load" else [connection], help=text)
        command.add_argument("model", metavar="MODEL", help="model id")
        command.set_defaults(func=model_command, op=op)


def _exit_codes(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn daemon and connection errors into a one-line message and an exit code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except EmbedError as exc:
            print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
            return EXIT_UNAVAILABLE if isinstance(exc, Unavailable) else EXIT_ERROR

    return run


def _client(args: argparse.Namespace, timeout: float = DEFAULT_TIMEOUT) -> Client:
    return Client(args.socket, timeout=timeout if args.timeout is None else args.timeout)


def _show(
    args: argparse.Namespace, call: Callable[[Client], Any], fmt: Callable[[Any], str], timeout: float = DEFAULT_TIMEOUT
) -> int:
    """Make one call and print its answer: as JSON with ``--json``, else formatted by ``fmt``."""
    with _client(args, timeout) as client:
        answer = call(client)
    print(json.dumps(answer, indent=2) if args.json else fmt(answer))
    return 0


@_exit_codes
def embed_command(args: argparse.Namespace) -> int:
    """Embed the texts and print a table, plus a similarity matrix for two or more."""
    if args.auto and args.model not in (None, AUTO_MODEL):
        raise SystemExit("akidb-embed embed: --auto chooses the model: leave out --model")
    with _client(args) as client:
        vectors = client.embed(
            args.texts, AUTO_MODEL if args.auto else args.model, normalize=args.normalize, truncate=args.truncate,
            prompt=args.prompt, dimensions=args.dimensions, keep_alive=args.keep_alive,
            constraints=constraints_of(args) if args.auto else None, expect_fingerprint=args.expect_fingerprint,
            allow_fallback=args.allow_fallback,
        )  # fmt: skip
    if args.json:
        print(json.dumps(embeddings_json(args.texts, vectors), indent=2))
        return 0
    similarity = ["", "cosine similarity", similarity_table(vectors)] if len(args.texts) > 1 else []
    print("\n".join([embeddings_table(args.texts, vectors), *choice_lines(vectors), *similarity]))
    return 0


def constraints_of(args: argparse.Namespace) -> dict[str, Any]:
    """The constraints given on the command line, as the protocol names them."""
    given = {
        "max_latency_ms": args.max_latency, "languages": args.languages, "dimension": args.dimensions,
        "max_memory_mb": args.max_memory, "task": args.task, "prefer": args.prefer,
    }  # fmt: skip
    return {key: value for key, value in given.items() if value is not None}


@_exit_codes
def models_command(args: argparse.Namespace) -> int:
    """Print every model in the catalog with its state; with --fits, those that meet the constraints."""
    if args.fits:
        return _show(args, lambda client: client.fits(constraints_of(args)), fits_table)
    return _show(args, Client.models, functools.partial(models_table, wide=args.wide))


@_exit_codes
def model_command(args: argparse.Namespace) -> int:
    """Load, unload, pin or unpin a model and print a line about it."""
    if args.op == "load":
        return _show(args, lambda client: client.load(args.model, args.keep_alive), model_summary, LOAD_TIMEOUT)
    timeout = LOAD_TIMEOUT if args.op == "tune" else DEFAULT_TIMEOUT  # tune answers once reloaded
    return _show(args, lambda client: getattr(client, args.op)(args.model), model_summary, timeout)


@_exit_codes
def bench_command(args: argparse.Namespace) -> int:
    """Profile each model in turn (progress on stderr), then print the profiles; with --plot, draw every profile."""
    profiles, failed = [], 0
    with _client(args, BENCH_TIMEOUT) as client:
        ids = args.models or [m["id"] for m in client.models() if m.get("state") not in ("invalid", "disabled")]
        for number, model_id in enumerate(ids, 1):
            print(f"bench: {model_id} ({number}/{len(ids)}): loading if need be, timing single texts, then batches",
                  file=sys.stderr, flush=True)  # fmt: skip
            try:
                profiles.append((model_id, client.bench(model_id, args.texts)))
            except EmbedError as exc:
                print(f"bench: {model_id}: error [{exc.code}]: {exc.message}", file=sys.stderr)
                failed += 1
                if isinstance(exc, Unavailable):
                    return EXIT_UNAVAILABLE
        everything = client.models() if args.plot else []  # the chart shows models profiled before too
    print(json.dumps(dict(profiles), indent=2) if args.json else profiles_table(profiles))
    if args.plot:
        chart.plot(args.plot, everything)
    return EXIT_ERROR if failed else 0


def top_command(args: argparse.Namespace) -> int:
    """The live view (``top.py``); each refresh waits for the daemon at most one interval."""
    if not args.interval > 0:
        raise SystemExit("akidb-embed top: --interval must be positive")
    with Client(args.socket, timeout=args.interval, retries=1) as client:
        if not args.once:
            top.live(client, args.interval)
            return 0
        frame = top.fetch(client)
        print("\n".join(top.render(frame, str(client.socket_path), args.interval)))
        return EXIT_UNAVAILABLE if isinstance(frame, str) else 0


@_exit_codes
def status_command(args: argparse.Namespace) -> int:
    """Print the daemon's status as aligned key/value lines."""
    return _show(args, Client.status, status_lines)


def _languages(text: str) -> list[str]:
    """``de,en`` as a list."""
    languages = [language.strip() for language in text.split(",") if language.strip()]
    if not languages:
        raise argparse.ArgumentTypeError("give language codes separated by commas, e.g. de,en")
    return languages


def seconds(text: str) -> float:
    """A duration for ``--keep-alive``: seconds, or with an s/m/h/d suffix, or ``forever``."""
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:])
    try:
        value = KEEP_ALIVE_FOREVER if text == "forever" else float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use seconds (30), 5m, 2h or forever")
    return float(value)
