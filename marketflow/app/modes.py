"""Live/test mode: which sources feed the pipeline, switchable at run time without a restart.

Switching stops the current sources the same way shutdown does (stop reading, drain the
queues into the aggregator) and then starts the other set. Test sources carry names of their
own (``test-exchange1`` ...), so synthetic data never lands under a live exchange's name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Literal

from marketflow.app.ingest import RunningSource
from marketflow.domain.feeds import FeedStatus, Source

log = logging.getLogger("marketflow.modes")

Mode = Literal["live", "test"]
SourceFactory = Callable[[], Sequence[Source[object]]]


class ModeController:
    """Owns the running sources of the mode in force."""

    def __init__(
        self,
        factories: dict[Mode, SourceFactory],
        names: dict[Mode, Sequence[str]],
        start: Callable[[Source[object]], RunningSource],
    ) -> None:
        """``start`` runs one source (its queue and worker pool, feeding the fan-in queue)."""
        self._factories = factories
        self._names = names
        self._start = start
        self._running: list[RunningSource] = []
        self._lock = asyncio.Lock()
        self.mode: Mode | None = None
        self.statuses: dict[str, FeedStatus] = {}  # every source ever started, by name

    def exchanges(self) -> Sequence[str]:
        """Exchange names of the mode in force ("all" in queries means these)."""
        return self._names[self.mode or "live"]

    def known_exchanges(self) -> list[str]:
        return [*self._names["live"], *self._names["test"]]

    def running(self) -> list[RunningSource]:
        return list(self._running)

    def healthy_sources(self) -> list[str]:
        """Sources connected and not stale now: their minutes count as covered."""
        return [
            r.name for r in self._running if r.source.status.connected and not r.source.status.stale
        ]

    async def switch(self, mode: Mode) -> Mode:
        """Make ``mode`` the one in force; a no-op when it already is."""
        async with self._lock:
            if mode == self.mode:
                return mode
            previous = self.mode
            await self._stop_all()
            self._running = [self._start(src) for src in self._factories[mode]()]
            for r in self._running:
                self.statuses[r.name] = r.source.status
            self.mode = mode
            log.info(
                "mode_switched from=%s to=%s sources=%s",
                previous,
                mode,
                ",".join(r.name for r in self._running),
            )
            return mode

    async def stop(self) -> None:
        async with self._lock:
            await self._stop_all()

    async def _stop_all(self) -> None:
        running, self._running = self._running, []
        await asyncio.gather(*(r.stop() for r in running))
