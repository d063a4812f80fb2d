"""Test mode: a synthetic source that produces the live feed's own bytes.

The generator renders JSON lines exactly as an exchange sends them (same walk, same format)
and puts them on the source queue, so test-mode ticks go through the same parser, worker pool
and aggregator as live ones. Only the source names differ (``test-exchangeN``), which keeps
synthetic data from ever being stored under a live exchange's name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.domain.feeds import Clock, FeedStatus, Source
from marketflow.domain.walk import PriceWalk, render_rounds, venue_start_prices
from marketflow.settings import TestModeSettings

Sleep = Callable[[float], Awaitable[None]]


class GeneratorProducer:
    """Puts one chunk per interval: one line per pair, all stamped with ``clock()``.

    The schedule is absolute (no drift); when the queue pushes back for longer than an
    interval, the missed intervals are skipped rather than sent in a burst, as a live
    exchange would not resend them either.
    """

    def __init__(
        self,
        walk: PriceWalk,
        interval_ms: int,
        clock: Clock,
        *,
        sleep: Sleep = asyncio.sleep,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self.walk = walk
        self.interval_s = interval_ms / 1000
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic

    async def run(self, out: asyncio.Queue[tuple[bytes, int]], status: FeedStatus) -> None:
        """Generate until cancelled."""
        monotonic = self._monotonic or asyncio.get_running_loop().time
        interval = self.interval_s
        status.address = "generator"
        status.connected = True
        status.stale = False
        try:
            next_at = monotonic() + interval
            while True:
                delay = next_at - monotonic()
                if delay > 0:
                    await self._sleep(delay)
                now_ms = self._clock()
                chunk = render_rounds(self.walk, 1, now_ms)
                status.chunks += 1
                status.bytes_in += len(chunk)
                await out.put((chunk, now_ms))
                next_at += interval
                now = monotonic()
                if next_at < now - interval:  # the consumer held us up: skip, don't burst
                    next_at = now + interval
        finally:
            status.connected = False


def build_generator_source(
    name: str,
    pairs: Sequence[str],
    settings: TestModeSettings,
    index: int,
    clock: Clock,
) -> Source[bytes]:
    """Test source number ``index`` (0-based): the walk of reference exchange ``index + 1``
    (its starting prices, the first exchange's beyond the third).

    Each source gets its own seed (``seed + index``) so the sources differ but a seeded run
    repeats exactly.
    """
    seed = None if settings.seed is None else settings.seed + index
    walk = PriceWalk(venue_start_prices(index), pairs, seed)
    status = FeedStatus(name=name, protocol="generator", address="generator")
    parser = JsonLinesParser(name, frozenset(pairs), status.rejects)
    producer = GeneratorProducer(walk, settings.interval_ms, clock)
    return Source(status=status, producer=producer, parser=parser)
