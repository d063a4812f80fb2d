"""Windows of the pairs other aggregate nodes own, so any node's API answers for every pair.

An aggregate node holds windows only for the symbols of its partitions; the others' recent
seconds and latest prices are in the shared Redis, their older minutes in PostgreSQL. While
someone asks about pairs this node does not hold (within ``WANTED_MS`` of the last such
question), the cache is read whole at most once per ``refresh_ms`` and those pairs' windows
are rebuilt from it (read only: nothing here is ever written back). The queries then take
them as they take the node's own: recent seconds from the window, minutes before its oldest
from the store. The first question about such a pair after a quiet spell waits for one read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from marketflow.domain.errors import CacheUnavailable
from marketflow.domain.ports import PriceCache
from marketflow.domain.window import PairWindow

log = logging.getLogger("marketflow.peer_windows")

WANTED_MS = 30_000


class PeerWindows:
    """Read-only windows of the pairs ``held`` rejects, rebuilt from the cache."""

    def __init__(
        self,
        cache: PriceCache,
        held: Callable[[str, str], bool],
        clock: Callable[[], int],
        *,
        refresh_ms: int = 1000,
    ) -> None:
        self._cache = cache
        self._held = held
        self._clock = clock
        self._refresh_ms = refresh_ms
        self._windows: dict[tuple[str, str], PairWindow] = {}
        self._wanted_until = 0
        self._wake = asyncio.Event()
        self._loaded = asyncio.Event()
        self._loaded_at = -(2**62)
        self.loads = 0

    def window(self, exchange: str, symbol: str) -> PairWindow | None:
        self._wanted_until = self._clock() + WANTED_MS
        self._wake.set()
        return self._windows.get((exchange, symbol))

    async def ready(self) -> None:
        """Until the windows come from a read at most two refresh periods old (after a quiet
        spell: the next read, bounded by a timeout)."""
        now = self._clock()
        self._wanted_until = now + WANTED_MS
        if now - self._loaded_at <= 2 * self._refresh_ms:
            return
        self._loaded.clear()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * self._refresh_ms / 1000 + 1):
                await self._loaded.wait()

    async def run(self) -> None:
        while True:
            if self._clock() >= self._wanted_until:
                self._windows = {}  # nobody asked for a while: hold nothing stale
                self._wake.clear()
                await self._wake.wait()
            await self._load()
            self._loaded_at = self._clock()
            self._loaded.set()
            await asyncio.sleep(self._refresh_ms / 1000)

    async def _load(self) -> None:
        try:
            latest, seconds = await self._cache.load(0, lambda ex, sym: not self._held(ex, sym))
        except CacheUnavailable as exc:
            log.warning("peer_windows_cache_unavailable error=%s", exc)
            return
        windows: dict[tuple[str, str], PairWindow] = {}  # the load read only others' pairs
        for s in seconds:
            key = (s.exchange, s.symbol)
            w = windows.get(key)
            if w is None:
                w = windows[key] = PairWindow(*key)
            w.seed_second(s.second, s.low, s.high, s.total, s.count)
        for lp in latest:
            key = (lp.exchange, lp.symbol)
            w = windows.get(key)
            if w is None:
                w = windows[key] = PairWindow(*key)
            w.latest_ts, w.latest_price, w.latest_received_ms = (
                lp.timestamp_ms,
                lp.price,
                lp.received_ms,
            )
        self._windows = windows
        self.loads += 1
