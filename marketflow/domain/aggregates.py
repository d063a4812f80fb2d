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
        """One aggregate of all parts (None for none); the latest time wins a tie."""
        if not parts:
            return None
        p = parts[0]
        out = cls(p.low, p.high, p.total, p.count, p.low_ms, p.high_ms)
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
        m = self.minute_ms
        return Aggregate(self.low, self.high, self.average * self.count, self.count, m, m)

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
