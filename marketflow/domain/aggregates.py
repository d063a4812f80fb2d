"""Aggregates: a mergeable (min, max, sum, count) and the per-minute row persisted for it."""

from __future__ import annotations

from dataclasses import dataclass

MINUTE_MS = 60_000


@dataclass(slots=True)
class Aggregate:
    """Min, max, sum and count of prices: exact to merge, so periods are exact too."""

    low: float
    high: float
    total: float
    count: int

    @property
    def average(self) -> float:
        return self.total / self.count

    def merge(self, other: Aggregate) -> None:
        if other.low < self.low:
            self.low = other.low
        if other.high > self.high:
            self.high = other.high
        self.total += other.total
        self.count += other.count

    @classmethod
    def merged(cls, parts: list[Aggregate]) -> Aggregate | None:
        if not parts:
            return None
        out = cls(parts[0].low, parts[0].high, parts[0].total, parts[0].count)
        for part in parts[1:]:
            out.merge(part)
        return out


@dataclass(frozen=True, slots=True)
class MinuteRow:
    """One persisted row: the ticks of one (exchange, symbol) in one minute of exchange time."""

    exchange: str
    symbol: str
    minute_ms: int  # start of the minute, Unix epoch milliseconds
    average: float
    low: float
    high: float
    count: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.exchange, self.symbol, self.minute_ms)

    def aggregate(self) -> Aggregate:
        return Aggregate(self.low, self.high, self.average * self.count, self.count)

    @classmethod
    def of(cls, exchange: str, symbol: str, minute_ms: int, agg: Aggregate) -> MinuteRow:
        return cls(exchange, symbol, minute_ms, agg.average, agg.low, agg.high, agg.count)


@dataclass(frozen=True, slots=True)
class LatestPrice:
    """The newest tick (by exchange timestamp) of one (exchange, symbol)."""

    exchange: str
    symbol: str
    price: float
    timestamp_ms: int
    received_ms: int


@dataclass(frozen=True, slots=True)
class SecondBucket:
    """The ticks of one (exchange, symbol) in one second of exchange time."""

    exchange: str
    symbol: str
    second: int  # Unix epoch seconds
    low: float
    high: float
    total: float
    count: int
