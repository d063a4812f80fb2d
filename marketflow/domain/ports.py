"""Ports: what the application needs from storage and cache, as structural protocols.

Adapters (PostgreSQL, SQLite, Redis, in-process) implement these without inheriting anything;
unit tests drive the application through in-memory fakes of them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from marketflow.domain.aggregates import (
    History,
    LatestPrice,
    Mark,
    MinuteRow,
    SecondBucket,
    SecondRow,
)


class MinuteStore(Protocol):
    """Durable per-minute aggregates, one row per (exchange, symbol, minute)."""

    kind: str  # "postgres" | "sqlite": shown in /health
    identity: str  # which database exactly (no credentials): a spill file is for one only

    async def upsert_minutes(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None:
        """Write rows and marks in one transaction. An existing (exchange, symbol, minute) is
        overwritten only by a row with at least as many ticks: a stored row never shrinks.

        Raises StoreUnavailable when the store cannot be reached (the caller keeps the rows).
        """
        ...

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> History:
        """Merge of the rows of ``symbol`` for each exchange in ``before`` whose minute starts
        before that exchange's bound (Unix ms) and, when ``since_ms`` is given, of the ticks
        at or after it (a row that straddles it counts its seconds from it on)."""
        ...

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        """Rows whose minute starts at or after ``since_ms`` (used to resume after a restart)."""
        ...

    async def load_marks(self) -> dict[str, Mark]:
        """The marks written with the rows, per source."""
        ...

    async def newest_minute_ms(self) -> int | None:
        """Start of the newest stored minute (exchange time), None when there is none."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...


class PriceCache(Protocol):
    """Latest prices and the per-second window, shared with other readers (e.g. Redis)."""

    kind: str  # "redis" | "memory": shown in /health

    async def write(
        self,
        latest: Sequence[LatestPrice],
        seconds: Collection[SecondRow],
        marks: Mapping[str, Mark] | None = None,
        *,
        whole: bool = False,
    ) -> bool:
        """Write in one transaction: latest price per key (newest timestamp wins), seconds
        (overwritten whole) and marks. Seconds expire after the retention. Returns True when
        the cache shows it lost earlier writes (restarted empty): the caller refills it.
        ``whole``: ``seconds`` is every second held (a refill), so each minute it touches
        may be replaced whole. Raises CacheUnavailable."""
        ...

    async def load(
        self, since_second: int, wanted: Callable[[str, str], bool] | None = None
    ) -> tuple[list[LatestPrice], list[SecondBucket]]:
        """Everything cached: latest prices and the seconds of every minute starting at or
        after ``since_second`` (whole minutes: pass a minute start); with ``wanted``, only
        the (exchange, symbol) pairs it accepts (a node taking partitions over)."""
        ...

    async def load_marks(self) -> dict[str, Mark]: ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...


class RowSpill(Protocol):
    """Where minute rows wait on local disk while the store is down (blocking calls: the
    writer runs them in a worker thread)."""

    path: Path

    def exists(self) -> bool: ...

    def count(self) -> int: ...

    def append(self, rows: list[MinuteRow], marks: dict[str, Mark]) -> None:
        """Append durably (fsync) before returning."""
        ...

    def read_chunk(
        self, offset: int, limit: int
    ) -> tuple[list[MinuteRow], dict[str, Mark], int]: ...

    def remove(self) -> None: ...
