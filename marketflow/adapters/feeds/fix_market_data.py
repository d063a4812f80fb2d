"""FIX market data (docs/protocols.md): 35=W / 35=X frames -> validated tick batches.

Trade entries (269=2) of incremental refreshes are ticks; bid and offer entries (269=0/1)
move the venue's top of book. A snapshot's trade entry repeats the last trade already
reported, so by default it is not a tick: counting it would add one tick per re-subscribe and
per reconnect and skew the averages. The parser keeps the top of book per symbol, so it must
see one source's messages in order (the ingest workers take items in queue order and parse
synchronously, which preserves that order).

An incremental trade entry with MDUpdateAction 1 or 2 corrects or cancels an earlier trade: it is
counted (``trade_correction`` / ``trade_cancel``), never a new tick. Trades that carry a TradeID
(1003) or MDEntryID (278) are de-duplicated over the last ``dedup_window`` ids (per symbol), so a
trade that reaches us twice (a re-subscription after an abandoned gap, a venue resending what a
new subscription repeats) counts once (``duplicate_trade``).

Each item carries the session's mark (the next expected inbound MsgSeqNum once its messages are
applied); the batch carries it on to the core, which makes it durable with the ticks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from marketflow.adapters.fix.md_decode import decode
from marketflow.adapters.fix.timestamps import entry_time_ms, parse_utc
from marketflow.domain.ticks import (
    MAX_AHEAD_MS,
    MAX_TS_MS,
    MIN_TS_MS,
    BookUpdate,
    RejectCounts,
    TickBatch,
)

_DECIMAL = re.compile(rb"-?(?:\d+\.?\d*|\.\d+)")  # FIX Price: no exponent, no inf/nan
_BID, _OFFER, _TRADE = b"0", b"1", b"2"
_DELETE = b"2"
_ACTIONS = (b"0", b"1", b"2")  # a tuple: one-byte values are shared objects, found by identity
_KINDS = (_TRADE, _BID, _OFFER)
_INF = float("inf")
_DECIMAL_CHARS = b"0123456789."
_DEDUP_WINDOW = 65536


@dataclass(frozen=True, slots=True)
class FixItem:
    """The market-data frames (35=W/35=X) of one read, in MsgSeqNum order, and the mark."""

    frames: list[bytes]
    mark: int | None = None


class FixMarketDataParser:
    """Turns the market-data frames of one read into one TickBatch; counts rejects by reason."""

    __slots__ = (
        "_book", "_published", "_seen", "_symbols", "_window", "exchange", "rejects",
        "snapshot_trades",
    )  # fmt: skip

    def __init__(
        self,
        exchange: str,
        symbols: Iterable[str],
        rejects: RejectCounts,
        *,
        snapshot_trades_as_ticks: bool = False,
        dedup_window: int = _DEDUP_WINDOW,
    ) -> None:
        self.exchange = exchange
        self.rejects = rejects
        self.snapshot_trades = snapshot_trades_as_ticks
        self._symbols = {s.encode(): s for s in symbols}
        self._book: dict[str, list[float | None]] = {}  # symbol -> [bid, ask]
        self._published: dict[str, tuple[float | None, float | None]] = {}
        self._seen: dict[tuple[str, bytes], None] = {}  # insertion-ordered: oldest first
        self._window = dedup_window

    def parse(self, item: FixItem | list[bytes], received_ms: int) -> TickBatch:
        """Parse complete, framed 35=W/35=X messages (framing was validated by the reader);
        a plain list of frames (a FIX log replayed from a file) has no mark."""
        frames, mark = (item.frames, item.mark) if isinstance(item, FixItem) else (item, None)
        batch = TickBatch(self.exchange, {}, received_ms, 0, mark=mark)
        for frame in frames:
            self._message(frame, batch)
        return batch

    def _message(  # noqa: C901 - the per-entry hot loop: a call per check costs more than it
        self, frame: bytes, batch: TickBatch
    ) -> None:
        msg_type, sending, msg_symbol, entries = decode(frame)
        if msg_type not in (b"X", b"W"):
            self.rejects.add("unexpected_msg_type", frame)
            return
        try:
            sending_ms = parse_utc(sending or b"")
        except ValueError:
            self.rejects.add("sending_time_invalid", frame)
            return
        snapshot = msg_type == b"W"
        rejects = self.rejects
        symbols = self._symbols
        book_of = self._book
        touched: dict[str, int] = {}
        future = batch.received_ms + MAX_AHEAD_MS
        sending_ts = sending_ms if MIN_TS_MS <= sending_ms <= MAX_TS_MS else None
        last_time: bytes | None = None  # the entries of a message share their MDEntryTime
        last_ts: int | None = None
        for action, kind, sym, px, etime, edate, trade_id, entry_id in entries:
            if snapshot or action is None:
                action = b"0"
            elif action not in _ACTIONS:
                rejects.add("bad_update_action", frame)
                continue
            symbol = symbols.get(sym or msg_symbol or b"")
            if symbol is None:
                rejects.add("unknown_symbol", frame)
                continue
            if kind not in _KINDS:
                rejects.add("entry_type_unsupported", frame)
                continue
            if not etime:
                ts = sending_ts
            elif etime == last_time and not edate:
                ts = last_ts
            else:
                ts = _entry_ts(etime, edate, sending_ms)
                last_time, last_ts = (None, None) if edate else (etime, ts)
            if ts is None:
                rejects.add("timestamp_invalid", frame)
                continue
            if ts > future:  # believed, it would pin "latest" and push the window into the past
                rejects.add("timestamp_in_future", frame)
                continue
            if snapshot and symbol not in touched:
                book_of[symbol] = [None, None]  # a snapshot replaces the whole book
                touched[symbol] = ts
            if action != b"0":
                if kind == _TRADE:  # a correction or cancel, not a new trade
                    rejects.add("trade_cancel" if action == _DELETE else "trade_correction", frame)
                    continue
                if action == _DELETE:
                    book_of.setdefault(symbol, [None, None])[kind == _OFFER] = None
                    touched[symbol] = ts
                    continue
            if not px or px.translate(None, _DECIMAL_CHARS):  # not only digits and dots
                rejects.add(_price_reason(px), frame)
                continue
            try:
                price = float(px)
            except ValueError:  # two dots, or no digit
                rejects.add("price_not_number", frame)
                continue
            if price <= 0.0 or price == _INF:
                rejects.add("price_not_positive" if price <= 0.0 else "price_not_finite", frame)
                continue
            if kind != _TRADE:
                book = book_of.get(symbol)
                if book is None:
                    book = book_of[symbol] = [None, None]
                book[kind == _OFFER] = price
                touched[symbol] = ts
            elif not snapshot or self.snapshot_trades:
                trade = trade_id or entry_id
                if trade and self._duplicate(symbol, trade):
                    rejects.add("duplicate_trade", frame)
                    continue
                points = batch.by_symbol.get(symbol)
                if points is None:
                    batch.by_symbol[symbol] = [(price, ts)]
                else:
                    points.append((price, ts))
                batch.count += 1
        for symbol, ts in touched.items():
            bid, ask = book = book_of[symbol]
            if self._published.get(symbol) != (bid, ask):
                self._published[symbol] = (book[0], book[1])
                batch.books.append(BookUpdate(self.exchange, symbol, bid, ask, ts))

    def _duplicate(self, symbol: str, trade_id: bytes) -> bool:
        key = (symbol, trade_id)
        seen = self._seen
        if key in seen:
            return True
        seen[key] = None
        if len(seen) > self._window:
            del seen[next(iter(seen))]
        return False


def _entry_ts(raw_time: bytes, raw_date: bytes | None, sending_ms: int) -> int | None:
    """Epoch ms of an MDEntryTime, dated by MDEntryDate (an empty one is none) or SendingTime."""
    try:
        ts = entry_time_ms(raw_time, sending_ms, raw_date or None)
    except ValueError:
        return None
    return ts if MIN_TS_MS <= ts <= MAX_TS_MS else None


def _price_reason(raw: bytes | None) -> str:
    """Why an MDEntryPx (270) with a character other than a digit or a dot is refused: the
    only decimals among those are negative (FIX Price has no exponent, no inf or nan)."""
    if raw is None:
        return "price_missing"
    if not _DECIMAL.fullmatch(raw):
        return "price_not_number"
    return "price_not_positive"
