"""Ports: what the application needs from storage and cache, as structural protocols.

Adapters (PostgreSQL, SQLite, Redis, in-process) implement these without inheriting anything;
unit tests drive the application through in-memory fakes of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from marketflow.domain.aggregates import Aggregate, LatestPrice, MinuteRow, SecondBucket


class MinuteStore(Protocol):
    """Durable per-minute aggregates, one row per (exchange, symbol, minute)."""

    kind: str  # "postgres" | "sqlite": shown in /health

    async def upsert_minutes(self, rows: Sequence[MinuteRow]) -> None:
        """Write rows in one batch; an existing (exchange, symbol, minute) is overwritten.

        Raises StoreUnavailable when the store cannot be reached (the caller keeps the rows).
        """
        ...

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> Aggregate | None:
        """Merge of every row of ``symbol`` for each exchange in ``before`` whose minute starts
        before that exchange's bound (Unix ms) and, when ``since_ms`` is given, ends after it
        (minute start > since_ms - 60000). None when there is no such row."""
        ...

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        """Rows whose minute starts at or after ``since_ms`` (used to resume after a restart)."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...


class PriceCache(Protocol):
    """Latest prices and the per-second window, shared with other readers (e.g. Redis)."""

    kind: str  # "redis" | "memory": shown in /health

    async def write(self, latest: Sequence[LatestPrice], seconds: Sequence[SecondBucket]) -> None:
        """Write in one round trip: latest price per key (newest timestamp wins) and seconds
        (overwritten whole). Seconds expire after the retention. Raises CacheUnavailable."""
        ...

    async def load(self, since_second: int) -> tuple[list[LatestPrice], list[SecondBucket]]:
        """Everything cached: latest prices and seconds at or after ``since_second``."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...
