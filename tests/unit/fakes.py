"""In-memory fakes of the ports, for unit tests only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from marketflow.domain.aggregates import Aggregate, LatestPrice, MinuteRow, SecondBucket
from marketflow.domain.errors import CacheUnavailable, StoreUnavailable


class FakeStore:
    kind = "fake"

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int], MinuteRow] = {}
        self.down = False
        self.writes = 0

    async def upsert_minutes(self, rows: Sequence[MinuteRow]) -> None:
        if self.down:
            raise StoreUnavailable("fake store is down")
        self.writes += 1
        for r in rows:
            self.rows[r.key] = r

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> Aggregate | None:
        if self.down:
            raise StoreUnavailable("fake store is down")
        parts = [
            r.aggregate()
            for r in self.rows.values()
            if r.symbol == symbol
            and r.exchange in before
            and r.minute_ms < before[r.exchange]
            and (since_ms is None or r.minute_ms > since_ms - 60_000)
        ]
        return Aggregate.merged(parts)

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        return [r for r in self.rows.values() if r.minute_ms >= since_ms]

    async def ping(self) -> bool:
        return not self.down

    async def aclose(self) -> None:
        pass


class FakeCache:
    kind = "fake"

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], LatestPrice] = {}
        self.seconds: dict[tuple[str, str, int], SecondBucket] = {}
        self.down = False
        self.writes = 0

    async def write(self, latest: Sequence[LatestPrice], seconds: Sequence[SecondBucket]) -> None:
        if self.down:
            raise CacheUnavailable("fake cache is down")
        self.writes += 1
        for lp in latest:
            old = self.latest.get((lp.exchange, lp.symbol))
            if old is None or lp.timestamp_ms >= old.timestamp_ms:
                self.latest[(lp.exchange, lp.symbol)] = lp
        for b in seconds:
            self.seconds[(b.exchange, b.symbol, b.second)] = b

    async def load(self, since_second: int) -> tuple[list[LatestPrice], list[SecondBucket]]:
        return list(self.latest.values()), [
            b for b in self.seconds.values() if b.second >= since_second
        ]

    async def ping(self) -> bool:
        return not self.down

    async def aclose(self) -> None:
        pass


class RecordingSink:
    """Stands in for the MinuteWriter: writes submitted rows straight into a FakeStore."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.submitted: list[MinuteRow] = []

    def submit(self, rows: Sequence[MinuteRow]) -> None:
        self.submitted.extend(rows)
        for r in rows:
            self.store.rows[r.key] = r


class ManualClock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms
