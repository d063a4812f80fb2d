"""Command line: ``marketflow [--port <N>] [--config <path>] [--role <R>]``,
``marketflow replay FILE``.

Errors a user can fix (bad argument, unreadable config, port in use) exit non-zero with one
clear line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn

import uvloop

from marketflow import logs
from marketflow.domain.archive import parse_duration
from marketflow.domain.errors import ConfigError, StoreUnavailable
from marketflow.settings import Settings, load_settings

USAGE = """\
Usage:
  marketflow [--port <N>] [--config <path>] [--role all|ingest|aggregate]
  marketflow replay <file> [--speed <X> | --max] [--config <path>]
  marketflow archive [--older-than <duration>] [--out <dir>] [--config <path>]
  marketflow dead-letters replay [--from-offset <N>] [--dry-run] [--config <path>]
  marketflow --help

Options:
  --port N       Port number for the REST API (default: config http.port, 8080)
  --config PATH  TOML configuration (default: ./config.toml when present)
  --role R       all: one process (default, config node.role) | ingest: read feeds, publish
                 ticks to Kafka | aggregate: consume them, write the stores, serve the API
  --help         Show this screen

Environment variables MARKETFLOW_* override the configuration, e.g.
MARKETFLOW_POSTGRES__DSN, MARKETFLOW_REDIS__URL, MARKETFLOW_HTTP__HOST.
"""

REPLAY_USAGE = """\
Usage:
  marketflow replay <file> [--speed <X> | --max] [--config <path>]

Replays a JSONL tick capture or a FIX log (SOH or '|' separated) through the pipeline.

Options:
  --speed X      Pace: X times the capture's own speed (default: 1.0)
  --max          As fast as possible (same as --speed 0)
  --config PATH  TOML configuration (default: ./config.toml when present)
  --help         Show this screen
"""

ARCHIVE_USAGE = """\
Usage:
  marketflow archive [--older-than <duration>] [--out <dir>] [--config <path>]

Moves whole UTC days of minute rows and FIX audit rows older than the cut-off from
PostgreSQL to Parquet files (one per table and day, plus manifest.json), reads every file
back and checks its row count and key checksum, then deletes the rows in one transaction
that checks they did not change since the export. One JSON line per table and day.

Options:
  --older-than D  Cut-off age: 7d, 12h, 30m, 45s (default: config archive.older_than)
  --out DIR       Archive directory, shared by every node (default: config archive.dir)
  --config PATH   TOML configuration (default: ./config.toml when present)
  --help          Show this screen

Exit status: 0 done, 1 database unreachable, 2 usage, 3 rows changed since the export
(nothing deleted), 4 a file failed its read-back (nothing deleted).
"""

DEAD_LETTERS_USAGE = """\
Usage:
  marketflow dead-letters replay [--from-offset <N>] [--dry-run] [--config <path>]

Re-publishes the records of kafka.dead_letter_topic at or after offset N that decode now
(a pair added, a newer version) to kafka.ticks_topic, key and value unchanged; prints a JSON
summary (read, replayed, still_invalid by reason, next_offset per partition).

Options:
  --from-offset N  First dead-letter offset to read, each partition (default: 0)
  --dry-run        Count what would be replayed; publish nothing
  --config PATH    TOML configuration (default: ./config.toml when present)
  --help           Show this screen
"""

DEFAULT_CONFIG = Path("config.toml")


class _Parser(argparse.ArgumentParser):
    """One line on stderr for a usage error; the hand-written screen for --help."""

    def __init__(self, *args: Any, screen: str = USAGE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._screen = screen

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)

    def format_help(self) -> str:
        return self._screen


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value}: use 1-65535")
    return value


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid speed {text!r}: not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid speed {value}: use a number >= 0")
    return value


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The one parser: the daemon's options, and the ``replay`` subcommand."""
    parser = _Parser(prog="marketflow")
    parser.add_argument("--port", type=_port)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--role", choices=("all", "ingest", "aggregate"))
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    replay = commands.add_parser("replay", screen=REPLAY_USAGE)
    replay.add_argument("file", type=Path)
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_speed, default=1.0)
    pace.add_argument("--max", action="store_true")
    # SUPPRESS: a --config given before ``replay`` is not reset by the subcommand's default.
    replay.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    archive = commands.add_parser("archive", screen=ARCHIVE_USAGE)
    archive.add_argument("--older-than", type=_duration, dest="older_than_s")
    archive.add_argument("--out", type=Path)
    archive.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    # -- the aggregate role (issue 14): dead letters back to the ticks topic
    letters = commands.add_parser("dead-letters", screen=DEAD_LETTERS_USAGE)
    letters.add_argument("action", choices=("replay",))
    letters.add_argument("--from-offset", type=int, default=0)
    letters.add_argument("--dry-run", action="store_true")
    letters.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    return parser


def resolve_settings(config: Path | None, port: int | None, role: str | None = None) -> Settings:
    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides: dict[str, object] = {}
    if role is not None:  # validated with the rest (a role without Kafka is a config error)
        overrides["node"] = {"role": role}
    settings = load_settings(path, **overrides)
    if port is not None:
        settings = settings.model_copy(
            update={"http": settings.http.model_copy(update={"port": port})}
        )
    return settings


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, load the settings, run the daemon or a replay; the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prog = f"marketflow {args.command}" if args.command else "marketflow"
    if args.command == "replay" and not args.file.is_file():
        sys.stderr.write(f"{prog}: {args.file} is not a readable file\n")
        return 2
    try:
        settings = resolve_settings(args.config, args.port, args.role)
    except ConfigError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    logs.configure(settings.log_format, settings.log_level)
    if args.command == "replay":
        speed = 0.0 if args.max else float(args.speed)
        return _run(_replay(settings, args.file, speed), prog)
    if args.command == "archive":
        older = args.older_than_s or parse_duration(settings.archive.older_than)
        return _run(_archive(settings, args.out or settings.archive.dir, older, prog), prog)
    if args.command == "dead-letters":
        return _run(_dead_letters(settings, args.from_offset, args.dry_run), prog)
    return _run(_serve(settings), prog)


def _run(main_coro: Coroutine[Any, Any, int], prog: str) -> int:
    """The daemon's event loop (uvloop) for the daemon and a replay alike (both tune the GC
    the same way: startup.tune_gc)."""
    try:
        return uvloop.run(main_coro)
    except ConfigError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


async def _serve(settings: Settings) -> int:
    from marketflow.bootstrap import run_daemon

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("marketflow").info("starting pid_signals=SIGINT,SIGTERM")
    return await run_daemon(settings, stop)


async def _replay(settings: Settings, path: Path, speed: float) -> int:
    """The file (a JSONL tick capture or a FIX log) through the same parser, workers,
    aggregator and storage as a live feed (wired in bootstrap.run_replay)."""
    from marketflow.bootstrap import run_replay

    return await run_replay(settings, path, speed)


async def _archive(settings: Settings, out: Path, older_than_s: int, prog: str) -> int:
    """One archive run (bootstrap.run_archive), one JSON line per table and day on stdout."""
    from marketflow.bootstrap import run_archive

    def emit(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    try:
        return await run_archive(settings, out, older_than_s, emit)
    except ConfigError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    except StoreUnavailable as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1


async def _dead_letters(settings: Settings, from_offset: int, dry_run: bool) -> int:
    """``marketflow dead-letters replay``: the summary as one JSON line on stdout."""
    from marketflow.bootstrap import run_dead_letter_replay

    if not settings.kafka.enabled:
        raise ConfigError("dead-letters replay needs kafka.bootstrap_servers")
    summary = await run_dead_letter_replay(settings, from_offset, dry_run=dry_run)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
