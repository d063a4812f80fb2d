"""Command line: ``marketflow [--port <N>] [--config <path>]``, ``marketflow replay FILE``.

Errors a user can fix (bad argument, unreadable config, port in use) exit non-zero with one
clear line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

import uvloop

from marketflow import logs
from marketflow.domain.errors import ConfigError
from marketflow.settings import Settings, load_settings

USAGE = """\
Usage:
  marketflow [--port <N>] [--config <path>]
  marketflow replay <file> [--speed <X> | --max] [--config <path>]
  marketflow --help

Options:
  --port N       Port number for the REST API (default: config http.port, 8080)
  --config PATH  TOML configuration (default: ./config.toml when present)
  --help         Show this screen

Environment variables MARKETFLOW_* override the configuration, e.g.
MARKETFLOW_POSTGRES__DSN, MARKETFLOW_REDIS__URL, MARKETFLOW_HTTP__HOST.
"""

DEFAULT_CONFIG = Path("config.toml")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"marketflow: {message} (see marketflow --help)\n")
        raise SystemExit(2)

    def format_help(self) -> str:
        return USAGE


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value}: use 1-65535")
    return value


def resolve_settings(config: Path | None, port: int | None) -> Settings:
    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    settings = load_settings(path)
    if port is not None:
        settings = settings.model_copy(
            update={"http": settings.http.model_copy(update={"port": port})}
        )
    return settings


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["replay"]:
        from marketflow.entrypoints.replay import main as replay_main

        return replay_main(args_in[1:])
    parser = _Parser(prog="marketflow", add_help=True)
    parser.add_argument("--port", type=_port)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(args_in)
    try:
        settings = resolve_settings(args.config, args.port)
    except ConfigError as exc:
        sys.stderr.write(f"marketflow: {exc}\n")
        return 2
    logs.configure(settings.log_format, settings.log_level)
    try:
        return uvloop.run(_serve(settings))
    except ConfigError as exc:
        sys.stderr.write(f"marketflow: {exc}\n")
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections: the hot path allocates short-lived lists and
    tuples by the million, none of them in cycles, so the default gen0 threshold (700) makes
    the collector run thousands of times a second for nothing. Objects alive after start
    (modules, settings, adapters) are frozen out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def _serve(settings: Settings) -> int:
    from marketflow.bootstrap import run_daemon

    tune_gc()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("marketflow").info("starting pid_signals=SIGINT,SIGTERM")
    return await run_daemon(settings, stop)
