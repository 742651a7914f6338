"""Command line: ``akidb-embed serve`` and ``convert`` here; the client commands (embed, models, bench, status, top,
events, load, unload, pin, unpin, tune) in cli.py."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__, cli, convert
from .log import setup_logging
from .settings import SettingsError, load_settings

log = logging.getLogger("akidb_embed")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="akidb-embed", description="On-device embedding daemon and its tools.")
    parser.add_argument("--version", action="version", version=f"akidb-embed {__version__}")
    commands = parser.add_subparsers(title="commands")
    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", type=Path, help="TOML config (default /etc/akidb-embed/akidb-embed.toml)")
    serve.add_argument("--socket", type=Path, help="socket path (default /run/akidb-embed/embed.sock)")
    serve.add_argument("--catalog", type=Path, help="manifest directory (default /etc/akidb-embed/models.d)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=_serve)
    convert.add_parser(commands)
    cli.add_client_commands(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level or "info")
    try:
        settings = load_settings(args.config, socket=args.socket, catalog=args.catalog, log_level=args.log_level)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    setup_logging(settings.log_level)
    from . import app
    from .server import BindError

    try:
        return app.run(settings)
    except BindError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
