"""``marketflow replay FILE [--speed X | --max] [--config PATH]``: replay a capture, then exit.

The file (a JSONL tick capture or a FIX log) goes through the same parser, workers, aggregator
and storage as a live feed; the minute rows it produces are written as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import NoReturn

from marketflow import logs
from marketflow.domain.errors import ConfigError
from marketflow.entrypoints.cli import resolve_settings

USAGE = """\
Usage:
  marketflow replay <file> [--speed <X> | --max] [--config <path>]

Replays a JSONL tick capture or a FIX log (SOH or '|' separated) through the pipeline.

Options:
  --speed X      Pace: X times the capture's own speed (default: 1.0)
  --max          As fast as possible (same as --speed 0)
  --config PATH  TOML configuration (default: ./config.toml when present)
  --help         Show this screen
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"marketflow replay: {message} (see marketflow replay --help)\n")
        raise SystemExit(2)

    def format_help(self) -> str:
        return USAGE


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid speed {text!r}: not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid speed {value}: use a number >= 0")
    return value


def main(argv: list[str]) -> int:
    """Parse the arguments, load the settings and run the replay; the process exit status."""
    parser = _Parser(prog="marketflow replay")
    parser.add_argument("file", type=Path)
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_speed, default=1.0)
    pace.add_argument("--max", action="store_true")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)
    path: Path = args.file
    if not path.is_file():
        sys.stderr.write(f"marketflow replay: {path} is not a readable file\n")
        return 2
    speed = 0.0 if args.max else float(args.speed)
    try:
        settings = resolve_settings(args.config, None)
    except ConfigError as exc:
        sys.stderr.write(f"marketflow replay: {exc}\n")
        return 2
    logs.configure(settings.log_format, settings.log_level)
    # The daemon wiring (storage, aggregator, worker pool around the file source) lives in
    # the composition root: marketflow.bootstrap.run_replay.
    from marketflow.bootstrap import run_replay

    return asyncio.run(run_replay(settings, path, speed))
