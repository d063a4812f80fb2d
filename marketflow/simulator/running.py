"""How a simulator venue runs as a process: until SIGINT/SIGTERM, one log line on failure."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

logging_format = "%(asctime)s %(levelname)s %(message)s"


async def serve_until_signalled(venue: AbstractAsyncContextManager[Any]) -> None:
    """Run ``venue`` (started and closed by its context manager) until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with venue:
        await stop.wait()


def run_venue(serve: Coroutine[Any, Any, None], log: logging.Logger, event: str) -> int:
    """The process body of a venue: 0 once signalled, 1 (and ``event`` logged) when it
    cannot listen."""
    logging.basicConfig(level=logging.INFO, format=logging_format)
    try:
        asyncio.run(serve)
    except OSError as exc:
        log.error("%s error=%s", event, exc)  # noqa: TRY400 - one line, not a traceback
        return 1
    return 0
