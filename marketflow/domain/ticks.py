"""Ticks as they travel through the pipeline.

A tick is a plain ``(symbol, price, timestamp_ms)`` tuple: creating a dataclass per tick would
cost more than parsing it. Ticks travel in batches, one batch per parsed chunk of one source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

Tick = tuple[str, float, int]
"""(symbol, price, exchange timestamp in Unix epoch milliseconds)."""

PricePoint = tuple[float, int]
"""(price, exchange timestamp in Unix epoch milliseconds) of one tick of a known symbol."""

SecondFold = list[float]
"""The ticks of one (symbol, epoch second) of one batch, folded while parsing:
``[low, high, total, count, newest_ts, price_at_newest_ts]`` (the newest tick, ties going to
the later one). A list, because the parser's hot loop updates it in place."""

FoldKey = tuple[str, int]
"""(symbol, epoch second)."""

# Timestamps outside this range are not epoch milliseconds (seconds, nanoseconds or junk).
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
MAX_AHEAD_MS = 60_000  # default: an exchange clock further ahead of ours is not believed
# Default largest believable price (pipeline.max_price). Far above any real quote, and low
# enough that sums of a day of ticks stay exact-ish floats instead of overflowing to inf.
MAX_PRICE = 1e12


Level = tuple[float, float | None]
"""One price level of a book side: (price, size); size None where the venue sends none."""


@dataclass(frozen=True, slots=True)
class BookUpdate:
    """The book of one venue for one symbol: top of book, with sizes where the venue sends
    them, and depth levels (best first) where it sends depth (FIX 264 > 1). ``bids`` /
    ``asks`` empty: top of book only (``bid``/``ask`` are then the whole book); otherwise
    their first level is ``bid``/``ask``. Positional construction of the first five fields
    stays as it was (the FIX and WebSocket parsers use it)."""

    exchange: str
    symbol: str
    bid: float | None
    ask: float | None
    timestamp_ms: int
    bid_size: float | None = None
    ask_size: float | None = None
    bids: tuple[Level, ...] = ()
    asks: tuple[Level, ...] = ()


@dataclass(slots=True)
class TickBatch:
    """The valid ticks of one chunk of one source, in one of two forms (or both):

    - ``by_symbol``: grouped by symbol, in arrival order (FIX, replay, the generator);
    - ``folded``: already folded per (symbol, second) by the parser (JSON lines' fast path),
      so the aggregator does per-bucket, not per-tick, work.

    Either way the aggregator looks a window up once per symbol (or bucket) per batch.
    """

    exchange: str
    by_symbol: dict[str, list[PricePoint]]
    received_ms: int
    count: int
    folded: dict[FoldKey, SecondFold] = field(default_factory=dict)
    books: list[BookUpdate] = field(default_factory=list)  # top-of-book changes (FIX venues)
    # Resume point of the source once this batch is durable: for FIX, the next expected
    # inbound MsgSeqNum (every lower one is in this batch or an earlier one). None: no mark.
    # Made durable with the ticks, so a restart asks for exactly what was not.
    mark: int | None = None
    # Whose position ``mark`` is (None: the exchange's own). A Kafka partition carries many
    # exchanges: its batches record the partition's next offset as "kafka:<topic>:<n>".
    mark_source: str | None = None

    def ticks(self) -> list[Tick]:
        """The ticks of ``by_symbol`` (a folded batch no longer has single ticks)."""
        if self.folded:
            raise ValueError("a folded batch has no single ticks: use seconds()")
        return [(sym, p, ts) for sym, points in self.by_symbol.items() for p, ts in points]

    def seconds(self) -> dict[FoldKey, SecondFold]:
        """Both forms as folded seconds (what the window receives), for comparisons."""
        out = {k: list(f) for k, f in self.folded.items()}
        for sym, points in self.by_symbol.items():
            fold_points(out, sym, points)
        return out


def fold_points(out: dict[FoldKey, SecondFold], symbol: str, points: list[PricePoint]) -> None:
    """Fold ``points`` of ``symbol`` into ``out``, as the parser's fast path does."""
    for price, ts in points:
        key = (symbol, ts // 1000)
        f = out.get(key)
        if f is None:
            out[key] = [price, price, price, 1, ts, price]
            continue
        if price < f[0]:
            f[0] = price
        elif price > f[1]:
            f[1] = price
        f[2] += price
        f[3] += 1
        if ts >= f[4]:
            f[4] = ts
            f[5] = price


@dataclass(slots=True)
class RejectCounts:
    """Rejected input per reason, with one raw sample per reason for the log.

    ``on_sample(reason, count, raw)`` is called for the 1st, 2nd, 4th, 8th ... reject of a
    reason (each time the count passes a power of two): a sample in the log, never a flood.
    """

    counts: dict[str, int] = field(default_factory=dict)
    samples: dict[str, bytes] = field(default_factory=dict)
    on_sample: Callable[[str, int, bytes], None] | None = None

    def add(self, reason: str, raw: bytes, n: int = 1) -> None:
        before = self.counts.get(reason, 0)
        after = self.counts[reason] = before + n
        if reason not in self.samples:
            self.samples[reason] = raw[:200]
        if self.on_sample is not None and after.bit_length() != before.bit_length():
            self.on_sample(reason, after, raw[:200])

    def total(self) -> int:
        return sum(self.counts.values())


def price_reject_reason(price: object, max_price: float = MAX_PRICE) -> str | None:
    """Why ``price`` is not a finite number in (0, ``max_price``], or None when it is one.

    ``bool`` is rejected explicitly: ``True`` is an ``int`` in Python. An int of any size is
    compared exactly, before it could overflow a float.
    """
    kind = type(price)
    if kind is float:
        assert isinstance(price, float)
        if not math.isfinite(price):
            return "price_not_finite"
        if price <= 0.0:
            return "price_not_positive"
        return None if price <= max_price else "price_out_of_range"
    if kind is int:
        assert isinstance(price, int)
        if price <= 0:
            return "price_not_positive"
        return None if price <= max_price else "price_out_of_range"
    if price is None:
        return "price_missing"
    return "price_not_number"
