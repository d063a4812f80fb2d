"""In-memory fakes of the ports, for unit tests only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from marketflow.domain.aggregates import (
    Aggregate,
    History,
    LatestPrice,
    Mark,
    MinuteRow,
    SecondBucket,
    SecondRow,
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
        self.failures = 0  # upserts refused while down
        self.calls: list[tuple[list[MinuteRow], dict[str, Mark]]] = []  # each landed upsert
        self.hold: asyncio.Event | None = None  # when set, each upsert waits for it (slow store)
        self.holding = 0  # upserts waiting on ``hold`` now

    async def upsert_minutes(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None:
        if self.hold is not None:
            self.holding += 1
            try:
                await self.hold.wait()
            finally:
                self.holding -= 1
        if self.down:
            self.failures += 1
            raise StoreUnavailable("fake store is down")
        self.writes += 1
        self.calls.append((list(rows), dict(marks) if marks is not None else {}))
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
        self.wholes: list[bool] = []  # each write's ``whole``
        self.carried: list[list[tuple[str, str, int]]] = []  # each write's seconds

    async def write(
        self,
        latest: Sequence[LatestPrice],
        seconds: Collection[SecondRow],
        marks: Mapping[str, Mark] | None = None,
        *,
        whole: bool = False,
    ) -> bool:
        if self.down:
            raise CacheUnavailable("fake cache is down")
        self.writes += 1
        self.wholes.append(whole)
        self.carried.append([(b[0], b[1], b[2]) for b in seconds])
        self.marks.update(marks or {})
        lost, self.lost = self.lost, False
        for lp in latest:
            old = self.latest.get((lp.exchange, lp.symbol))
            if old is None or lp.timestamp_ms >= old.timestamp_ms:
                self.latest[(lp.exchange, lp.symbol)] = lp
        for b in seconds:
            self.seconds[(b[0], b[1], b[2])] = SecondBucket(*b)
        return lost

    async def load(
        self, since_second: int, wanted: Callable[[str, str], bool] | None = None
    ) -> tuple[list[LatestPrice], list[SecondBucket]]:
        start = since_second // 60 * 60
        ok = wanted or (lambda _ex, _sym: True)
        return [p for p in self.latest.values() if ok(p.exchange, p.symbol)], [
            b for b in self.seconds.values() if b.second >= start and ok(b.exchange, b.symbol)
        ]

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


class FakeSpill:
    """A ``RowSpill`` in memory: one entry per row or marks line, like the JSON-lines file.

    ``append`` can be made to fail (``fail_append``) or to block in its worker thread until
    ``release`` is set (``block``), so a test can act while an append is under way.
    """

    def __init__(self, path: Path = Path("var/spill/minutes-fake.jsonl")) -> None:
        self.path = path
        self.lines: list[MinuteRow | dict[str, Mark]] = []
        self.appends: list[tuple[list[MinuteRow], dict[str, Mark]]] = []
        self.reads: list[tuple[int, int]] = []  # (offset, limit) of each read_chunk
        self.removed = 0
        self.present = False
        self.fail_append: OSError | None = None
        self.block = False
        self.appending = threading.Event()  # an append is waiting for ``release``
        self.release = threading.Event()

    def preload(self, *lines: MinuteRow | dict[str, Mark]) -> None:
        """A file left by an earlier run."""
        self.lines.extend(lines)
        self.present = True

    def exists(self) -> bool:
        return self.present

    def count(self) -> int:
        return sum(1 for line in self.lines if isinstance(line, MinuteRow))

    def append(self, rows: list[MinuteRow], marks: dict[str, Mark]) -> None:
        if self.block:
            self.appending.set()
            self.release.wait(10)
        if self.fail_append is not None:
            raise self.fail_append
        self.appends.append((list(rows), dict(marks)))
        self.lines.extend(rows)
        if marks:
            self.lines.append(dict(marks))
        self.present = True

    def read_chunk(self, offset: int, limit: int) -> tuple[list[MinuteRow], dict[str, Mark], int]:
        self.reads.append((offset, limit))
        rows: list[MinuteRow] = []
        marks: dict[str, Mark] = {}
        i = offset
        while i < len(self.lines) and len(rows) < limit:
            line = self.lines[i]
            i += 1
            if isinstance(line, MinuteRow):
                rows.append(line)
            else:
                marks.update(line)
        return rows, marks, i

    def remove(self) -> None:
        self.removed += 1
        self.lines.clear()
        self.present = False


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
