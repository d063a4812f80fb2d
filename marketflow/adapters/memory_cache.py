"""In-process price cache: the Redis cache's contract without Redis (embedded mode).

Mirrors Redis semantics: the newest exchange timestamp wins for latest prices, seconds are
overwritten whole, and each minute of seconds expires ``retention_s + 120`` s after its last
write (by the injected monotonic clock, as a Redis TTL would).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

from marketflow.domain.aggregates import LatestPrice, Mark, SecondBucket, SecondRow
from marketflow.domain.errors import CacheUnavailable
from marketflow.lifecycle import Closing

EXPIRY_MARGIN_S = 120

_MinuteKey = tuple[str, str, int]  # (exchange, symbol, minute start in epoch seconds)


class MemoryPriceCache(Closing):
    """``PriceCache`` in a dict; lost on restart, like a Redis without persistence."""

    kind = "memory"

    def __init__(self, retention_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = retention_s + EXPIRY_MARGIN_S
        self._clock = clock
        self._latest: dict[tuple[str, str], LatestPrice] = {}
        self._minutes: dict[_MinuteKey, dict[int, SecondRow]] = {}
        self._expires: dict[_MinuteKey, float] = {}
        self._marks: dict[str, Mark] = {}
        self._closed = False

    async def write(
        self,
        latest: Sequence[LatestPrice],
        seconds: Collection[SecondRow],
        marks: Mapping[str, Mark] | None = None,
        *,
        whole: bool = False,
    ) -> bool:
        """Newest-wins latest prices; whole seconds; refresh their minute's expiry; marks."""
        self._check_open()
        if marks:
            self._marks.update(marks)
        for p in latest:
            key = (p.exchange, p.symbol)
            current = self._latest.get(key)
            if current is None or current.timestamp_ms <= p.timestamp_ms:
                self._latest[key] = p
        expires = self._clock() + self._ttl
        for b in seconds:
            mkey = (b[0], b[1], b[2] // 60 * 60)
            self._minutes.setdefault(mkey, {})[b[2]] = b
            self._expires[mkey] = expires
        self._evict()
        return False  # it lives and dies with the process: never lost while we run

    async def load_marks(self) -> dict[str, Mark]:
        self._check_open()
        return dict(self._marks)

    async def load(
        self, since_second: int, wanted: Callable[[str, str], bool] | None = None
    ) -> tuple[list[LatestPrice], list[SecondBucket]]:
        """Every latest price and the unexpired seconds of every minute from the one
        holding ``since_second`` on (whole minutes, as Redis answers); only the pairs
        ``wanted`` accepts, when given."""
        self._check_open()
        self._evict()
        seconds = [
            SecondBucket(*b)
            for (ex, sym, minute), buckets in self._minutes.items()
            if minute + 60 > since_second and (wanted is None or wanted(ex, sym))
            for b in buckets.values()
        ]
        latest = [p for p in self._latest.values() if wanted is None or wanted(p[0], p[1])]
        return latest, seconds

    def _evict(self) -> None:
        now = self._clock()
        for mkey in [k for k, exp in self._expires.items() if exp <= now]:
            del self._expires[mkey]
            del self._minutes[mkey]

    async def ping(self) -> bool:
        return not self._closed

    async def aclose(self) -> None:
        """Forget everything; safe to call twice."""
        self._closed = True
        self._latest.clear()
        self._minutes.clear()
        self._expires.clear()
        self._marks.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheUnavailable("memory: cache is closed")
