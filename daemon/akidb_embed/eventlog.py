"""``akidb-embed events``: the daemon's lifecycle events printed live, one line each, until Ctrl-C.

A client command like the others (it needs only the events socket's permissions); the events
themselves are ``events.py``'s, listed in docs/protocol.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from akidb_embed_client import Client, Event


def add_parser(subparsers: Any) -> None:
    """Register ``events`` on an argparse subparsers object."""
    parser = subparsers.add_parser("events", help="print the daemon's lifecycle events live, until Ctrl-C")
    parser.add_argument(
        "--socket", metavar="PATH", help="daemon socket (default: $AKIDB_EMBED_SOCKET or /run/akidb-embed/embed.sock)"
    )
    parser.add_argument(
        "--events-socket", metavar="PATH", help="events socket (default: <socket stem>.events.sock beside the socket)"
    )
    parser.add_argument("--model", metavar="M", action="append", help="only this model's events (repeat for more)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(func=events_command)


def events_command(args: argparse.Namespace) -> int:
    """Print events as they come; a restarted daemon is followed, Ctrl-C ends it quietly."""
    with Client(args.socket) as client, client.events(args.model, events_socket=args.events_socket) as stream:
        print(f"listening on ipc://{stream.path} (Ctrl-C stops)", file=sys.stderr, flush=True)
        try:
            for event in stream:
                print(json.dumps(event_json(event)) if args.json else event_line(event), flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def event_json(event: Event) -> dict[str, Any]:
    """The event as one flat JSON object: the common keys, then its fields."""
    common = {"time": event.time, "seq": event.seq, "kind": event.kind, "event": event.event, "model": event.model}
    return {**common, **event.fields, "restarted": event.restarted, "missed": event.missed}


def event_line(event: Event) -> str:
    """Local time, event, model, then ``key=value`` fields, and a note on a restart or lost events."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time)) + f".{int(event.time % 1 * 1000):03d}"
    fields = " ".join(f"{key}={value}" for key, value in event.fields.items())
    notes = ["[daemon restarted]"] * event.restarted + [f"[{event.missed} missed]"] * bool(event.missed)
    return " ".join([stamp, f"{event.event:<15}", f"{event.model or '-':<20}", fields, *notes]).rstrip()
