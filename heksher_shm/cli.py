"""The ``heksher-shm`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _features(text: str) -> list[str]:
    features = [f.strip() for f in text.split(",") if f.strip()]
    if not features:
        raise argparse.ArgumentTypeError("give at least one context feature, e.g. user,theme,environment")
    return features


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``heksher-shm``."""
    parser = argparse.ArgumentParser(
        prog="heksher-shm", description="Heksher client with one poller per host: tools."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the in-memory Heksher service until interrupted")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=8888, help="port to listen on, 0 for any free one (default: 8888)"
    )
    serve.add_argument(
        "--context-features",
        type=_features,
        default=["user", "theme", "environment"],
        help="comma-separated context features, in order (default: user,theme,environment)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from heksher_shm.testing._cli import serve

        return serve(args.host, args.port, args.context_features)
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
