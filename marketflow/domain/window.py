"""The rolling window of one (exchange, symbol): per-second buckets of exchange time.

Per-second buckets keep every period query exact (min, max and sum/count merge exactly) while
memory and cache writes grow with pairs x exchanges x seconds, not with the tick rate.
"""

from __future__ import annotations

from collections.abc import Iterable

from marketflow.domain.aggregates import Aggregate, LatestPrice, MinuteRow, SecondBucket
from marketflow.domain.ticks import PricePoint

Bucket = list[float]
"""[low, high, total, count]: a list, because the hot loop updates it in place."""


class PairWindow:
    """Seconds of one (exchange, symbol) kept for ``retention_s``, plus its latest tick.

    A minute is emitted once closed (``grace_ms`` after its end by the later of the wall clock
    and the newest exchange timestamp), and again whenever a late tick changes it: rows are
    upserts, so a re-emit rewrites, never doubles. Ticks older than the retained seconds (the
    retention counts back from the pair's newest tick) are counted as ``late`` and dropped.
    """

    __slots__ = (
        "bases",
        "dirty_seconds",
        "exchange",
        "floor_second",
        "late",
        "latest_price",
        "latest_received_ms",
        "latest_ts",
        "pending_minutes",
        "seconds",
        "symbol",
    )

    def __init__(self, exchange: str, symbol: str) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.seconds: dict[int, Bucket] = {}
        self.bases: dict[int, Aggregate] = {}  # minute_ms -> part persisted by an earlier run
        self.dirty_seconds: set[int] = set()
        self.pending_minutes: set[int] = set()  # minute_ms changed since last emitted
        self.floor_second = 0
        self.late = 0
        self.latest_price = 0.0
        self.latest_ts = -1
        self.latest_received_ms = 0

    def add(self, points: Iterable[PricePoint], received_ms: int) -> None:
        """Fold ticks of this pair into their seconds (the per-tick hot path)."""
        seconds = self.seconds
        dirty = self.dirty_seconds
        floor = self.floor_second
        latest_ts = self.latest_ts
        latest_price = self.latest_price
        cur_sec = -1
        b: Bucket = []
        for price, ts in points:
            sec = ts // 1000
            if sec != cur_sec:
                # Consecutive ticks mostly share a second: look the bucket up once per run.
                if sec < floor:
                    self.late += 1
                    continue
                got = seconds.get(sec)
                if got is None:
                    got = seconds[sec] = [price, price, 0.0, 0]
                b = got
                dirty.add(sec)
                cur_sec = sec
            if price < b[0]:
                b[0] = price
            elif price > b[1]:
                b[1] = price
            b[2] += price
            b[3] += 1
            if ts >= latest_ts:
                latest_ts = ts
                latest_price = price
        if latest_ts != self.latest_ts or latest_price != self.latest_price:
            self.latest_ts = latest_ts
            self.latest_price = latest_price
            self.latest_received_ms = received_ms

    def latest(self) -> LatestPrice | None:
        if self.latest_ts < 0:
            return None
        return LatestPrice(
            self.exchange, self.symbol, self.latest_price, self.latest_ts, self.latest_received_ms
        )

    def seed_second(self, second: int, low: float, high: float, total: float, count: int) -> None:
        """Restore a second written to the cache by an earlier run (merged with any new ticks)."""
        if second < self.floor_second:
            return
        b = self.seconds.get(second)
        if b is None:
            self.seconds[second] = [low, high, total, count]
        else:
            b[0] = min(b[0], low)
            b[1] = max(b[1], high)
            b[2] += total
            b[3] += count

    def seed_minute(self, row: MinuteRow) -> None:
        """Restore a persisted minute no cached second covers, so a re-emit keeps its ticks."""
        start = row.minute_ms // 1000
        if any(start <= s < start + 60 for s in self.seconds):
            return
        self.bases[row.minute_ms] = row.aggregate()

    def take_dirty_seconds(self) -> list[SecondBucket]:
        """Seconds changed since the last call; their minutes become pending."""
        out = []
        seconds = self.seconds
        for sec in self.dirty_seconds:
            b = seconds.get(sec)
            if b is None:
                continue
            out.append(SecondBucket(self.exchange, self.symbol, sec, b[0], b[1], b[2], int(b[3])))
            self.pending_minutes.add(sec // 60 * 60_000)
        self.dirty_seconds.clear()
        return out

    def all_seconds(self) -> list[SecondBucket]:
        return [
            SecondBucket(self.exchange, self.symbol, s, b[0], b[1], b[2], int(b[3]))
            for s, b in self.seconds.items()
        ]

    def minute_aggregate(self, minute_ms: int) -> Aggregate | None:
        start = minute_ms // 1000
        parts = [_agg(s, b) for s, b in self.seconds.items() if start <= s < start + 60]
        base = self.bases.get(minute_ms)
        if base is not None:
            parts.append(base)
        return Aggregate.merged(parts)

    def closed_minutes(self, clock_ms: int, grace_ms: int) -> list[MinuteRow]:
        """Pending minutes that have closed by ``clock_ms``; they stop being pending."""
        clock = max(clock_ms, self.latest_ts)
        rows = []
        for minute in sorted(self.pending_minutes):
            if minute + 60_000 + grace_ms > clock:
                continue
            self.pending_minutes.discard(minute)
            agg = self.minute_aggregate(minute)
            if agg is not None:
                rows.append(MinuteRow.of(self.exchange, self.symbol, minute, agg))
        return rows

    def open_minutes(self) -> list[MinuteRow]:
        """Every pending minute, closed or not (the partial minute at shutdown)."""
        rows = []
        for minute in sorted(self.pending_minutes):
            agg = self.minute_aggregate(minute)
            if agg is not None:
                rows.append(MinuteRow.of(self.exchange, self.symbol, minute, agg))
        self.pending_minutes.clear()
        return rows

    def evict(self, retention_s: int) -> None:
        """Forget whole minutes older than the retention; later ticks for them count as late.

        The retention runs on the pair's own (exchange) time, not the wall clock: a replay of
        a capture hours old keeps its window, and a feed that stops keeps its last minutes.
        """
        if self.latest_ts < 0:
            return
        floor = (self.latest_ts // 1000 - retention_s) // 60 * 60
        if any(m // 1000 < floor for m in self.pending_minutes):
            floor = min(floor, min(self.pending_minutes) // 1000)
        if floor <= self.floor_second:
            return
        self.floor_second = floor
        for s in [s for s in self.seconds if s < floor]:
            del self.seconds[s]
        for m in [m for m in self.bases if m // 1000 < floor]:
            del self.bases[m]

    def oldest_minute_ms(self) -> int | None:
        """Start of the oldest minute held here: history before it comes from storage."""
        starts = [s // 60 * 60_000 for s in self.seconds]
        starts.extend(self.bases)
        return min(starts) if starts else None

    def period(self, from_second: int, to_second: int) -> Aggregate | None:
        parts = [_agg(s, b) for s, b in self.seconds.items() if from_second <= s <= to_second]
        return Aggregate.merged(parts)

    def everything(self) -> Aggregate | None:
        parts = [_agg(s, b) for s, b in self.seconds.items()]
        parts.extend(self.bases.values())
        return Aggregate.merged(parts)


def _agg(second: int, b: Bucket) -> Aggregate:
    ms = second * 1000
    return Aggregate(b[0], b[1], b[2], int(b[3]), ms, ms)
