"""In-memory fakes of the ports, for unit tests only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from marketflow.domain.aggregates import (
    Aggregate,
    History,
    LatestPrice,
    Mark,
    MinuteRow,
    SecondBucket,
)
from marketflow.domain.errors import CacheUnavailable, StoreUnavailable


class FakeStore:
    kind = "fake"
    identity = "fake-store"

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int], MinuteRow] = {}
        self.marks: dict[str, Mark] = {}
        self.down = False
        self.writes = 0

    async def upsert_minutes(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None:
        if self.down:
            raise StoreUnavailable("fake store is down")
        self.writes += 1
        for r in rows:
            old = self.rows.get(r.key)
            if old is None or old.count <= r.count:  # a stored row never shrinks
                self.rows[r.key] = r
        for source, mark in (marks or {}).items():
            if source not in self.marks or self.marks[source][1] <= mark[1]:
                self.marks[source] = mark

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> History:
        if self.down:
            raise StoreUnavailable("fake store is down")
        chosen = [
            r
            for r in self.rows.values()
            if r.symbol == symbol
            and r.exchange in before
            and r.minute_ms < before[r.exchange]
            and (since_ms is None or r.minute_ms > since_ms - 60_000)
        ]
        from_s = 0 if since_ms is None else since_ms // 1000
        parts = [p for r in chosen if (p := r.part_since(from_s)) is not None]
        incomplete = sum(1 for r in chosen if not r.complete)
        return History(Aggregate.merged(parts), len(chosen), incomplete)

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        return [r for r in self.rows.values() if r.minute_ms >= since_ms]

    async def load_marks(self) -> dict[str, Mark]:
        return dict(self.marks)

    async def newest_minute_ms(self) -> int | None:
        return max((r.minute_ms for r in self.rows.values()), default=None)

    async def ping(self) -> bool:
        return not self.down

    async def aclose(self) -> None:
        pass


class FakeCache:
    kind = "fake"

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], LatestPrice] = {}
        self.seconds: dict[tuple[str, str, int], SecondBucket] = {}
        self.marks: dict[str, Mark] = {}
        self.down = False
        self.writes = 0
        self.lost = False  # the next write reports lost data (a Redis restarted empty)

    async def write(
        self,
        latest: Sequence[LatestPrice],
        seconds: Sequence[SecondBucket],
        marks: Mapping[str, Mark] | None = None,
    ) -> bool:
        if self.down:
            raise CacheUnavailable("fake cache is down")
        self.writes += 1
        self.marks.update(marks or {})
        lost, self.lost = self.lost, False
        for lp in latest:
            old = self.latest.get((lp.exchange, lp.symbol))
            if old is None or lp.timestamp_ms >= old.timestamp_ms:
                self.latest[(lp.exchange, lp.symbol)] = lp
        for b in seconds:
            self.seconds[(b.exchange, b.symbol, b.second)] = b
        return lost

    async def load(self, since_second: int) -> tuple[list[LatestPrice], list[SecondBucket]]:
        start = since_second // 60 * 60
        return list(self.latest.values()), [b for b in self.seconds.values() if b.second >= start]

    async def load_marks(self) -> dict[str, Mark]:
        return dict(self.marks)

    def wipe(self) -> None:
        """Everything lost, as a Redis restarted without persistence."""
        self.latest.clear()
        self.seconds.clear()
        self.marks.clear()
        self.lost = True

    async def ping(self) -> bool:
        return not self.down

    async def aclose(self) -> None:
        pass


class RecordingSink:
    """Stands in for the MinuteWriter: writes submitted rows straight into a FakeStore."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.submitted: list[MinuteRow] = []

    def submit(self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None) -> None:
        self.submitted.extend(rows)
        for r in rows:
            old = self.store.rows.get(r.key)
            if old is None or old.count <= r.count:
                self.store.rows[r.key] = r
        self.store.marks.update(marks or {})


class ManualClock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms
