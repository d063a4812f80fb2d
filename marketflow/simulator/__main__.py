"""``python -m marketflow.simulator``: a stand-in for the reference exchange programs.

python -m marketflow.simulator --port 40101 [--host 127.0.0.1] [--rate N] [--seed S]
python -m marketflow.simulator --protocol fix --port 40111 ...   (a FIX 4.4 venue)
python -m marketflow.simulator --protocol websocket --port 40121 ...   (Binance-style streams)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, cast

from marketflow.simulator.json_exchange import DEFAULT_RATE, serve

log = logging.getLogger("marketflow.simulator")

# Each protocol but json is its own module with its own options and main(argv).
VENUE_MODULES = {
    "fix": "marketflow.simulator.fix_venue",
    "websocket": "marketflow.simulator.ws_venue",
}
PROTOCOLS = ("json", *VENUE_MODULES)


def _protocol_of(argv: list[str]) -> tuple[str, list[str]]:
    """The ``--protocol`` value and the arguments without it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--protocol", choices=PROTOCOLS, default="json")
    known, rest = pre.parse_known_args(argv)
    return cast(str, known.protocol), rest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m marketflow.simulator",
        description=(
            "Exchange simulator: streams newline-delimited JSON prices "
            '({"symbol","price","timestamp"}) to every client of a TCP port, one line per pair '
            "every 100 ms by default. Stop it with Ctrl-C or SIGTERM."
        ),
        epilog="With --protocol fix the simulator is a FIX 4.4 venue (acceptor) instead, with "
        "--protocol websocket a Binance-style WebSocket venue; run "
        "'python -m marketflow.simulator --protocol fix --help' (or websocket) for its options.",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="json",
                        help="wire protocol (default: json)")  # fmt: skip
    parser.add_argument("--port", type=int, default=40101,
                        help="TCP port; 40101/40102/40103 pick that exchange's starting prices "
                        "(default: 40101)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"lines per second per connection (default: {DEFAULT_RATE}); "
                        "hundreds of thousands for benchmarks")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="seed of the price walk")
    return parser


async def _serve_until_signal(host: str, port: int, rate: float, seed: int | None) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(serve(host, port, rate, seed), name="simulator")

    def stop(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(task.cancel)

    # Plain handlers, not loop.add_signal_handler: under uvloop with a busy firehose loop the
    # latter was seen to miss SIGTERM, and a shell's background job starts with SIGINT
    # ignored (which uvloop keeps). A Python handler runs between any two callbacks.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # optional speed-up for the firehose

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency, but plain asyncio works
        runner = asyncio.Runner()
    with runner:
        runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator; returns the process exit status."""
    args_in = sys.argv[1:] if argv is None else argv
    protocol, rest = _protocol_of(args_in)
    if protocol in VENUE_MODULES:
        # Imported here: each venue is its own module, with its own options.
        venue = importlib.import_module(VENUE_MODULES[protocol])
        venue_main = cast(Callable[[list[str]], int], venue.main)
        return venue_main(rest)
    args = _parser().parse_args(args_in)
    if not 0 < args.port < 65536:
        _parser().error("--port must be 1..65535")
    if args.rate <= 0:
        _parser().error("--rate must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        _run(_serve_until_signal(args.host, args.port, args.rate, args.seed))
    except OSError as exc:
        log.error("simulator_failed port=%d error=%s", args.port, exc)  # noqa: TRY400
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
