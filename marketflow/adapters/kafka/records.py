"""Tick records on the Kafka ticks topic: what an ingest node publishes and an aggregate node
consumes.

One record holds the ticks of one (exchange, symbol) from one parsed batch, keyed by the
symbol, so every venue of a symbol lands in one partition and one aggregate node can build
the symbol's cross-venue view. The value is msgpack (msgspec), a positional array whose first
field is the schema version; a consumer refuses a version it does not know instead of
guessing. A record carries the batch in the form the parser made it:

- ``points``: single ticks ``[price, timestamp_ms]`` in arrival order (FIX, WebSocket, replay);
- ``seconds``: ticks already folded per epoch second by the JSON-lines fast path
  ``[second, low, high, total, count, newest_ts, price_at_newest_ts]``: the aggregation is
  the same (min, max, sum and count per second are exact), at a fraction of the bytes;
- ``books``: the venue's book changes for the symbol (top of book and depth levels).

Decoding validates as strictly as the feed parsers do (finite positive prices within range,
epoch-millisecond timestamps, counts that add up): a record that fails is a ``RecordError``
with a reason the consumer counts, dead-letters and skips.
"""

from __future__ import annotations

import math

import msgspec

from marketflow.domain.ticks import (
    MAX_PRICE,
    MAX_TS_MS,
    MIN_TS_MS,
    BookUpdate,
    FoldKey,
    Level,
    PricePoint,
    SecondFold,
    TickBatch,
    price_reject_reason,
)

SCHEMA_VERSION = 1


class RecordError(ValueError):
    """A record that cannot become ticks; ``reason`` is the counter's label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Book(msgspec.Struct, array_like=True, gc=False):
    bid: float | None
    ask: float | None
    timestamp_ms: int
    bid_size: float | None
    ask_size: float | None
    bids: list[tuple[float, float | None]]
    asks: list[tuple[float, float | None]]


class TickRecord(msgspec.Struct, array_like=True, gc=False):
    """The value of one record (field order is the wire format: append only)."""

    version: int
    exchange: str
    symbol: str
    received_ms: int
    count: int  # ticks in points + seconds: a torn record cannot pass as a smaller one
    points: list[tuple[float, int]]
    seconds: list[tuple[int, float, float, float, int, int, float]]
    books: list[_Book]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TickRecord, strict=True)


def encode_batch(batch: TickBatch) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` per symbol of ``batch``: its points, folded seconds and books."""
    points: dict[str, list[tuple[float, int]]] = {}
    for symbol, pts in batch.by_symbol.items():
        if pts:
            points[symbol] = list(pts)
    seconds: dict[str, list[tuple[int, float, float, float, int, int, float]]] = {}
    for (symbol, second), f in batch.folded.items():
        row = (second, f[0], f[1], f[2], int(f[3]), int(f[4]), f[5])
        seconds.setdefault(symbol, []).append(row)
    books: dict[str, list[_Book]] = {}
    for b in batch.books:
        books.setdefault(b.symbol, []).append(
            _Book(b.bid, b.ask, b.timestamp_ms, b.bid_size, b.ask_size, list(b.bids), list(b.asks))
        )
    out: list[tuple[bytes, bytes]] = []
    for symbol in sorted({*points, *seconds, *books}):
        pts = points.get(symbol, [])
        secs = seconds.get(symbol, [])
        count = len(pts) + sum(s[4] for s in secs)
        record = TickRecord(
            SCHEMA_VERSION,
            batch.exchange,
            symbol,
            batch.received_ms,
            count,
            pts,
            secs,
            books.get(symbol, []),
        )
        out.append((symbol.encode(), _encoder.encode(record)))
    return out


def decode_record(
    value: bytes | None,
    *,
    symbols: frozenset[str] | None = None,
    max_price: float = MAX_PRICE,
) -> TickBatch:
    """The batch one record carries, validated; ``RecordError`` when it is not one.

    ``symbols``: the configured pairs (None: any). The batch's ``mark`` is left unset: the
    consumer sets its own resume point (the partition's next offset)."""
    if not value:
        raise RecordError("record_empty")
    try:
        rec = _decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        if _version_of(value) not in (None, SCHEMA_VERSION):
            raise RecordError("record_unknown_version", f"version {_version_of(value)}") from None
        raise RecordError("record_undecodable", str(exc)) from None
    if rec.version != SCHEMA_VERSION:
        raise RecordError("record_unknown_version", f"version {rec.version}")
    if not rec.exchange or not rec.symbol:
        raise RecordError("record_unnamed")
    if symbols is not None and rec.symbol not in symbols:
        raise RecordError("unknown_symbol", rec.symbol)
    points: list[PricePoint] = []
    for price, ts in rec.points:
        _check_price(price, max_price)
        _check_ts(ts)
        points.append((price, ts))
    folded = _seconds(rec, max_price)
    total_count = len(points) + sum(int(f[3]) for f in folded.values())
    if total_count != rec.count:
        raise RecordError("record_count_mismatch", f"{total_count} ticks, header says {rec.count}")
    books = [_book(rec, b, max_price) for b in rec.books]
    return TickBatch(
        rec.exchange,
        {rec.symbol: points} if points else {},
        rec.received_ms,
        total_count,
        folded,
        books,
    )


def _seconds(rec: TickRecord, max_price: float) -> dict[FoldKey, SecondFold]:
    folded: dict[FoldKey, SecondFold] = {}
    for second, low, high, total, count, newest_ts, newest_price in rec.seconds:
        if count < 1 or not (low <= newest_price <= high) or newest_ts // 1000 != second:
            raise RecordError("record_inconsistent_second", f"second {second}")
        for p in (low, high, newest_price):
            _check_price(p, max_price)
        # The sum of count prices lies between count x low and count x high (float slack).
        if not (
            math.isfinite(total) and low * count * 0.999999 <= total <= high * count * 1.000001
        ):
            raise RecordError("record_inconsistent_second", f"second {second} total")
        _check_ts(newest_ts)
        key = (rec.symbol, second)
        if key in folded:
            raise RecordError("record_inconsistent_second", f"second {second} twice")
        folded[key] = [low, high, total, float(count), float(newest_ts), newest_price]
    return folded


def _book(rec: TickRecord, b: _Book, max_price: float) -> BookUpdate:
    for p in (b.bid, b.ask):
        if p is not None:
            _check_price(p, max_price)
    _check_ts(b.timestamp_ms)
    return BookUpdate(
        rec.exchange,
        rec.symbol,
        b.bid,
        b.ask,
        b.timestamp_ms,
        b.bid_size,
        b.ask_size,
        _levels(b.bids, max_price),
        _levels(b.asks, max_price),
    )


def _version_of(value: bytes) -> object:
    """The first field of a record of another layout (a newer writer's), if it has one."""
    try:
        fields = msgspec.msgpack.decode(value)
    except msgspec.DecodeError:
        return None
    return fields[0] if isinstance(fields, list) and fields else None


def _check_price(price: float, max_price: float) -> None:
    reason = price_reject_reason(price, max_price)
    if reason is not None:
        raise RecordError(reason, repr(price))


def _check_ts(ts: int) -> None:
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise RecordError("timestamp_out_of_range", str(ts))


def _levels(levels: list[tuple[float, float | None]], max_price: float) -> tuple[Level, ...]:
    for price, size in levels:
        _check_price(price, max_price)
        if size is not None and not (math.isfinite(size) and size >= 0):
            raise RecordError("record_bad_size", repr(size))
    return tuple(levels)
