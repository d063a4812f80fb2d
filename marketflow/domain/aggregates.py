"""Aggregates: a mergeable (min, max, sum, count) and the per-minute row persisted for it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

MINUTE_MS = 60_000
FULL_MINUTE_MS = 60_000  # covered_ms of a minute the source was up for from start to end

SecondState = tuple[int, float, float, float, int]
"""(epoch second, low, high, total, count): one second of a minute row, as it was written."""

Mark = tuple[int, int]
"""(position, made_ms): a source's resume position (FIX: next expected inbound MsgSeqNum) and
the wall time of the flush that made it durable; the newest one wins at a restart."""


@dataclass(slots=True)
class Aggregate:
    """Min, max, sum and count of prices: exact to merge, so periods are exact too."""

    low: float
    high: float
    total: float
    count: int
    low_ms: int = 0  # start of the second (or minute) where the low / high was seen
    high_ms: int = 0

    @property
    def average(self) -> float:
        return self.total / self.count

    def merge(self, other: Aggregate) -> None:
        if other.low < self.low or (other.low == self.low and other.low_ms > self.low_ms):
            self.low = other.low
            self.low_ms = other.low_ms
        if other.high > self.high or (other.high == self.high and other.high_ms > self.high_ms):
            self.high = other.high
            self.high_ms = other.high_ms
        self.total += other.total
        self.count += other.count

    @classmethod
    def merged(cls, parts: list[Aggregate]) -> Aggregate | None:
        """One aggregate of all parts (None for none); the latest time wins a tie.

        The sum is ``math.fsum`` of the parts' sums: exact whatever the order of the parts,
        so an average over many seconds and minutes stays within 1e-9 of the true mean.
        """
        if not parts:
            return None
        p = parts[0]
        out = cls(p.low, p.high, p.total, p.count, p.low_ms, p.high_ms)
        for part in parts[1:]:
            out.merge(part)
        if len(parts) > 1:
            out.total = math.fsum(part.total for part in parts)
        return out


@dataclass(frozen=True, slots=True)
class MinuteRow:
    """One persisted row: the ticks of one (exchange, symbol) in one minute of exchange time.

    ``seconds`` keeps the per-second parts the row was computed from, so a restart can merge
    the row with cached seconds second by second (the fuller version of each second wins)
    instead of choosing between the two; None on rows written before it existed.
    ``covered_ms``: how much of the minute the source was up and the daemon running (a lower
    bound; 60000 means complete), None on rows written before it existed.
    """

    exchange: str
    symbol: str
    minute_ms: int  # start of the minute, Unix epoch milliseconds
    average: float
    low: float
    high: float
    count: int
    covered_ms: int | None = None
    seconds: tuple[SecondState, ...] | None = None
    # ``seconds`` already packed (domain/seconds_pack.py) when the window had them so: the
    # stores write these bytes instead of packing the seconds again. Not part of equality.
    packed: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.exchange, self.symbol, self.minute_ms)

    @property
    def complete(self) -> bool:
        return self.covered_ms is not None and self.covered_ms >= FULL_MINUTE_MS

    def aggregate(self) -> Aggregate:
        m = self.minute_ms
        return Aggregate(self.low, self.high, self.average * self.count, self.count, m, m)

    def part_since(self, from_second: int) -> Aggregate | None:
        """The ticks of the seconds at or after ``from_second`` (exact when ``seconds`` is
        known; otherwise the whole row when it starts at or after it, else nothing)."""
        if self.seconds is None:
            return self.aggregate() if self.minute_ms // 1000 >= from_second else None
        parts = [
            Aggregate(lo, hi, total, n, s * 1000, s * 1000)
            for s, lo, hi, total, n in self.seconds
            if s >= from_second
        ]
        return Aggregate.merged(parts)

    @classmethod
    def of(
        cls,
        exchange: str,
        symbol: str,
        minute_ms: int,
        agg: Aggregate,
        covered_ms: int | None = None,
        seconds: tuple[SecondState, ...] | None = None,
    ) -> MinuteRow:
        return cls(
            exchange,
            symbol,
            minute_ms,
            agg.average,
            agg.low,
            agg.high,
            agg.count,
            covered_ms,
            seconds,
        )


class LatestPrice(NamedTuple):
    """The newest tick (by exchange timestamp) of one (exchange, symbol).

    A NamedTuple, like SecondBucket: a flush builds one per changed pair, and a frozen
    dataclass costs three times as much to build."""

    exchange: str
    symbol: str
    price: float
    timestamp_ms: int
    received_ms: int


class SecondBucket(NamedTuple):
    """The ticks of one (exchange, symbol) in one second of exchange time."""

    exchange: str
    symbol: str
    second: int  # Unix epoch seconds
    low: float
    high: float
    total: float
    count: int  # type: ignore[assignment]  # shadows tuple.count, on purpose


SecondRow = tuple[str, str, int, float, float, float, int]
"""A ``SecondBucket``'s fields as a plain tuple: what a flush carries to the cache. A plain
tuple of atoms is untracked by the garbage collector once it survives one collection; a
NamedTuple never is, and a backfill's flush holds a million of them across its round trips
(gen2 collections of 300-500 ms). Built 8x faster, too. A ``SecondBucket`` is one."""


@dataclass(slots=True)
class History:
    """What the minute store holds for a query: the merged rows and how complete they were."""

    aggregate: Aggregate | None
    minutes: int = 0  # (exchange, minute) rows merged
    incomplete_minutes: int = 0  # of those, rows not covered for the whole minute

    def add_partial(self, rows: list[MinuteRow], from_second: int) -> None:
        """Merge in the part of each row (a minute straddling a period's start) from
        ``from_second`` on."""
        parts = [self.aggregate] if self.aggregate is not None else []
        for row in rows:
            part = row.part_since(from_second)
            if part is not None:
                parts.append(part)
                self.minutes += 1
                self.incomplete_minutes += 0 if row.complete else 1
        self.aggregate = Aggregate.merged(parts)
