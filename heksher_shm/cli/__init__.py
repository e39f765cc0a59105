"""The ``heksher-shm`` command line: the parser and the dispatch to each subcommand.

Subcommands live in their own modules: ``status``/``watch`` in
:mod:`heksher_shm.cli.status`, ``dump`` in :mod:`heksher_shm.cli.dump`,
``clean`` in :mod:`heksher_shm.cli.clean`,
``demo`` in :mod:`heksher_shm.cli.demo` and ``serve`` in
:mod:`heksher_shm.cli.serve`. Expected failures raise
:class:`heksher_shm.cli.common.CliError` and end as one line on stderr and
an exit code (the summary in ``heksher-shm --help``, each command's own in
``heksher-shm COMMAND --help``), never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from heksher_shm._model.snapshot import FORMAT as SNAPSHOT_FORMAT
from heksher_shm._shm.layout import FORMAT_VERSION as SEGMENT_FORMAT
from heksher_shm._version import __version__
from heksher_shm.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    CliError,
    silence_stdout,
)

__all__ = ["build_parser", "main"]

VERSION = f"heksher-shm {__version__} (segment format {SEGMENT_FORMAT}, snapshot format {SNAPSHOT_FORMAT})"
"""What ``heksher-shm --version`` prints: the package's version and the file formats it reads."""

_DIRECTORY = """\
The segment directory is --dir, else $HEKSHER_SHM_DIR, else /dev/shm/heksher_shm-<uid>-<pidns>
(<pidns>: the PID namespace, the inode of /proc/self/ns/pid).
"""

_EPILOG = f"""\
exit codes (each command's --help lists its own):
  {EXIT_OK}    success; status: every segment in use is ok (one that no live process uses, left
       over by processes that have exited, counts only when named or with --strict)
  {EXIT_UNHEALTHY}    status: a segment is empty, leaderless, unresponsive or stale, or idle and
       counted; clean: a file could not be removed; demo: a step failed; serve: it cannot listen
  {EXIT_USAGE}    bad command line; watch: no NAME, and not exactly one segment in use
  {EXIT_NOT_FOUND}    not found: the directory, the named segment or setting, or no segments at all
  {EXIT_UNREADABLE}    unreadable: a segment or the directory is another user's or a symlink, or a
       segment is corrupted; clean: a segment was left alone, not judged
  130  interrupted (Ctrl-C), except watch, which exits {EXIT_OK}

{_DIRECTORY}"""

_STATUS_EPILOG = f"""\
verdicts:
  ok            a live leader keeps its promises of progress and updates in time
  idle          no live process uses it (no live leader, none attached): left over by
                processes that have exited
  empty         processes use it, but nothing is published yet (a leader is starting)
  leaderless    processes use it, but no live leader serves it
  unresponsive  the leader is alive but broke its promise of progress by over 5 s
  stale         no successful update for longer than the staleness bound: two update
                intervals plus 5 s, or $HEKSHER_SHM_STALE_AFTER seconds when set
  corrupted     the file fails validation (damaged, or another version's format)
  unreadable    the file is another user's, a symlink, or has group or other permissions

A segment that no live process uses (idle, or corrupted and unused) counts only when it is
given as NAME or with --strict: a leftover is not a failure, but a segment you name must be
served.

exit codes:
  {EXIT_OK}    every segment shown is ok, or not in use and not counted; with --prometheus: the
       metrics were printed (the segments' health is in them)
  {EXIT_UNHEALTHY}    a segment is empty, leaderless, unresponsive or stale, or idle and counted
  {EXIT_USAGE}    bad command line, or NAME is not a segment name
  {EXIT_NOT_FOUND}    the directory or the named segment does not exist, there are no segments,
       or (--ignore-idle) none is in use
  {EXIT_UNREADABLE}    a segment is unreadable, or corrupted (and in use, or counted), or the
       directory cannot be used
  130  interrupted (Ctrl-C)
  With several segments, status exits with the highest code among them.

{_DIRECTORY}"""

_DUMP_EPILOG = f"""\
exit codes:
  {EXIT_OK}    printed (also a segment with nothing published yet)
  {EXIT_USAGE}    bad command line, or NAME is not a segment name
  {EXIT_NOT_FOUND}    the directory or the named segment does not exist, there are no segments,
       or no segment holds the --setting
  {EXIT_UNREADABLE}    a segment is corrupted or unreadable, or the directory cannot be used
       (with several segments, the others are printed first)
  130  interrupted (Ctrl-C)

{_DIRECTORY}"""

_WATCH_EPILOG = f"""\
Without NAME, watch follows the only segment in the directory, else the only one that live
processes use (segments left over by exited processes are idle); when none or several are in
use it exits {EXIT_USAGE}, naming them.

exit codes:
  {EXIT_OK}    stopped after --count lines, or with Ctrl-C
  {EXIT_USAGE}    bad command line, NAME is not a segment name, or no NAME and not exactly
       one segment in use
  {EXIT_NOT_FOUND}    the directory or the named segment does not exist, or there are no segments
  {EXIT_UNREADABLE}    the segment or the directory cannot be used (another user's, a symlink,
       wrong permissions); a corrupted segment is watched and shows as corrupted

{_DIRECTORY}"""

_CLEAN_EPILOG = f"""\
A segment is in use, and kept whole, while its election or takeover lock is held (tried
with flock, without waiting: a leader holds it), or a live process (or one of another PID
namespace) has an entry in its registry folder. Files another user owns,
symbolic links and files with loosened modes are never judged nor removed. --dry-run takes
each lock for a moment too, to tell whether someone holds it.

exit codes:
  {EXIT_OK}    every unused segment was removed (--dry-run: listed), or there was none; also
       when the default directory does not exist
  {EXIT_UNHEALTHY}    a file could not be removed (the line names it)
  {EXIT_USAGE}    bad command line, or NAME is not a segment name
  {EXIT_NOT_FOUND}    the directory given (--dir, $HEKSHER_SHM_DIR) does not exist, or no file of the
       named segment is there
  {EXIT_UNREADABLE}    the directory cannot be used, or a segment was not judged: one of its files is
       another user's, a symlink or has loosened modes, or its registry folder holds a file
       heksher_shm does not make (left alone)
  130  interrupted (Ctrl-C)
  With several segments, clean exits with the highest code among them.

{_DIRECTORY}"""

_DEMO_EPILOG = f"""\
exit codes:
  {EXIT_OK}    every worker converged after each change
  {EXIT_UNHEALTHY}    a step failed: a worker did not converge, none took over, or one died
  {EXIT_USAGE}    bad command line
  {EXIT_UNREADABLE}    --dir (or $HEKSHER_SHM_DIR) cannot be used
  130  interrupted (Ctrl-C); 143 on SIGTERM (workers stopped and files removed either way)
"""


def _features(text: str) -> list[str]:
    features = [f.strip() for f in text.split(",") if f.strip()]
    if not features:
        raise argparse.ArgumentTypeError("give at least one context feature, e.g. user,theme,environment")
    return features


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _add_segment_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "name", nargs="?", metavar="NAME", help=f"the segment's name, as `status` lists it (default: {what})"
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="the segment directory (default: $HEKSHER_SHM_DIR, else /dev/shm/heksher_shm-<uid>-<pidns>)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``heksher-shm``."""
    parser = argparse.ArgumentParser(
        prog="heksher-shm",
        description="Heksher client with one poller per host: inspect and clean up the shared\n"
        "segments, run the demo, or run an in-memory Heksher service.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=VERSION,
        help="print the version, and the segment and snapshot formats it reads, and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser(
        "status",
        help="leader, freshness and processes of each segment; a health check",
        description="Show each segment's leader, generation, heartbeat, last update and error,\n"
        "live processes, settings and rules, and a verdict. Exits non-zero when a segment\n"
        "that live processes use is not healthy, so it can serve as a health check. A\n"
        "segment left over by processes that have exited is idle, and fails only when it\n"
        "is named (status NAME) or with --strict.",
        epilog=_STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_segment_arguments(status, "every segment in the directory")
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of text")
    output.add_argument(
        "--prometheus",
        action="store_true",
        help="print the metrics in Prometheus's text format (for node_exporter's textfile collector) "
        f"and exit {EXIT_OK} once printed, whatever the segments' health",
    )
    status.add_argument(
        "--ignore-idle",
        action="store_true",
        help="leave out idle segments: those no live process uses (left over by processes that exited)",
    )
    status.add_argument(
        "--strict",
        action="store_true",
        help="count segments that no live process uses as failures (idle: exit 1), as status NAME "
        "does for the named one",
    )

    dump = commands.add_parser(
        "dump",
        help="the defaults and rules a segment holds",
        description="Print the settings of the current snapshot: each default and rule,\n"
        "with their raw JSON values decoded.",
        epilog=_DUMP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_segment_arguments(dump, "every segment in the directory")
    dump.add_argument("--setting", metavar="NAME", help="only this setting")
    dump.add_argument("--json", action="store_true", help="print JSON instead of text")

    watch = commands.add_parser(
        "watch",
        help="one line per published generation, leader change or update error",
        description="Follow a segment: print a line with the time, generation, settings and\n"
        "rules, leader pid and outcome of the last update, first for the current state\n"
        "and then at every change, until Ctrl-C.",
        epilog=_WATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_segment_arguments(watch, "the only segment in the directory, else the only one in use")
    watch.add_argument(
        "--interval",
        type=_positive_float,
        default=0.1,
        metavar="S",
        help="seconds between looks (default: 0.1)",
    )
    watch.add_argument("--count", type=_positive_int, metavar="N", help="stop after printing N lines")

    clean = commands.add_parser(
        "clean",
        help="remove the files of segments no live process uses",
        description="Remove the segments left over by processes that have exited: each segment's\n"
        "file, its lock files and its registry folder (registrations and doorbells). A segment\n"
        "in use is kept whole. With --dry-run, list what would be removed and remove nothing.",
        epilog=_CLEAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_segment_arguments(clean, "every segment in the directory")
    clean.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")

    demo = commands.add_parser(
        "demo",
        help="watch worker processes share one poller, survive a SIGKILLed leader",
        description="Start an in-memory Heksher service and worker processes (thread and async\n"
        "clients) serving one setting; change its rules, SIGKILL the leader, and print what\n"
        "happens. Finishes by itself (in about --duration seconds) and cleans up.",
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--workers", type=_positive_int, default=4, metavar="N", help="worker processes (default: 4)"
    )
    demo.add_argument(
        "--duration",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds the demo runs once the workers are up (default: 10)",
    )
    demo.add_argument(
        "--dir",
        metavar="DIR",
        help="segment directory (default: $HEKSHER_SHM_DIR, else a private temporary one)",
    )

    serve = commands.add_parser(
        "serve",
        help="run the in-memory Heksher service until interrupted",
        description="Run heksher_shm's in-memory Heksher service (the one tests get from\n"
        "heksher_shm.testing) on HOST:PORT: the Heksher v1 HTTP API, answered as a real\n"
        "Heksher 0.5.7 answers it, for trying clients by hand. Not for production: its\n"
        "settings and rules live in memory only and are lost when it stops.\n"
        "\n"
        "It prints its URL on the first line, serves until SIGINT (Ctrl-C) or SIGTERM,\n"
        "then prints a line saying it stopped and exits 0; it exits 1 when it cannot\n"
        "listen (the port is taken, say). Clients declare their settings themselves and\n"
        "must use the same context features, in the same order (--context-features);\n"
        "add rules with curl against /api/v1/rules.",
        epilog="example:\n"
        "  heksher-shm serve --port 8888 --context-features user,theme,environment\n"
        "  curl -s http://127.0.0.1:8888/api/v1/query     # from another shell\n"
        "\n"
        "The documentation's Testing page has curl examples that add, change and\n"
        "delete rules.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=8888, help="port to listen on, 0 for any free one (default: 8888)"
    )
    serve.add_argument(
        "--context-features",
        type=_features,
        default=["user", "theme", "environment"],
        metavar="A,B,...",
        help="comma-separated context features, in order (default: user,theme,environment)",
    )
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        from heksher_shm.cli.status import run_status

        return run_status(args.dir, args.name, args.json, args.ignore_idle, args.strict, args.prometheus)
    if args.command == "dump":
        from heksher_shm.cli.dump import run_dump

        return run_dump(args.dir, args.name, args.setting, args.json)
    if args.command == "watch":
        from heksher_shm.cli.status import run_watch

        return run_watch(args.dir, args.name, args.interval, args.count)
    if args.command == "clean":
        from heksher_shm.cli.clean import run_clean

        return run_clean(args.dir, args.name, args.dry_run)
    if args.command == "demo":
        from heksher_shm.cli.demo import run_demo

        return run_demo(workers=args.workers, duration=args.duration, shm_dir=args.dir)
    if args.command == "serve":
        from heksher_shm.cli.serve import serve

        return serve(args.host, args.port, args.context_features)
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects unknown commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        # The library's own warnings (a foreign registry entry, say) go to stderr, one line each.
        logging.basicConfig(level=logging.WARNING, format="heksher-shm: %(name)s: %(levelname)s: %(message)s")
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's flush at exit
        return code
    except CliError as e:
        print(f"heksher-shm {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`heksher-shm watch | head -3`): it had what it wanted, and there is
        # nothing left to say to it, so exit quietly and successfully. `status` and `dump` catch it
        # themselves, to exit with what they found (a closed pipe does not make a segment healthy);
        # the demo's failure stays a failure.
        silence_stdout()
        return EXIT_UNHEALTHY if args.command == "demo" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
