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

from marketflow.adapters.fix.codec import SOH
from marketflow.adapters.fix.timestamps import entry_time_ms, parse_utc
from marketflow.domain.ticks import (
    MAX_AHEAD_MS,
    MAX_TS_MS,
    MIN_TS_MS,
    BookUpdate,
    PricePoint,
    RejectCounts,
    TickBatch,
)

_DECIMAL = re.compile(rb"-?(?:\d+\.?\d*|\.\d+)")  # FIX Price: no exponent, no inf/nan
_BID, _OFFER, _TRADE = b"0", b"1", b"2"
_DELETE = b"2"
_ACTIONS = frozenset((b"0", b"1", b"2"))
_INF = float("inf")
Entry = dict[bytes, bytes]
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

    def _message(self, frame: bytes, batch: TickBatch) -> None:
        msg_type, sending, msg_symbol, entries = _split(frame)
        if msg_type not in (b"W", b"X"):
            self.rejects.add("unexpected_msg_type", frame)
            return
        try:
            sending_ms = parse_utc(sending or b"")
        except ValueError:
            self.rejects.add("sending_time_invalid", frame)
            return
        snapshot = msg_type == b"W"
        touched: dict[str, int] = {}
        for e in entries:
            self._entry(e, snapshot, msg_symbol, sending_ms, frame, batch, touched)
        for symbol, ts in touched.items():
            bid, ask = book = self._book[symbol]
            if self._published.get(symbol) != (bid, ask):
                self._published[symbol] = (book[0], book[1])
                batch.books.append(BookUpdate(self.exchange, symbol, bid, ask, ts))

    def _entry(
        self,
        e: Entry,
        snapshot: bool,
        msg_symbol: bytes | None,
        sending_ms: int,
        frame: bytes,
        batch: TickBatch,
        touched: dict[str, int],
    ) -> None:
        kind = e.get(b"269")
        action = b"0" if snapshot else e.get(b"279", b"0")
        if action not in _ACTIONS:
            self.rejects.add("bad_update_action", frame)
            return
        symbol = self._symbols.get(e.get(b"55") or msg_symbol or b"")
        if symbol is None:
            self.rejects.add("unknown_symbol", frame)
            return
        if kind not in (_BID, _OFFER, _TRADE):
            self.rejects.add("entry_type_unsupported", frame)
            return
        ts = _entry_ts(e, sending_ms)
        if ts is None:
            self.rejects.add("timestamp_invalid", frame)
            return
        if ts > batch.received_ms + MAX_AHEAD_MS:
            # Believed, it would pin "latest" and push the window into the past.
            self.rejects.add("timestamp_in_future", frame)
            return
        if snapshot and symbol not in touched:
            self._book[symbol] = [None, None]  # a snapshot replaces the whole book
            touched[symbol] = ts
        if action != b"0" and kind == _TRADE:  # a correction or cancel, not a new trade
            self.rejects.add("trade_cancel" if action == _DELETE else "trade_correction", frame)
            return
        if action == _DELETE:
            self._book.setdefault(symbol, [None, None])[kind == _OFFER] = None
            touched[symbol] = ts
            return
        price = _price(e.get(b"270"))
        if type(price) is str:
            self.rejects.add(price, frame)
            return
        assert isinstance(price, float)
        if kind == _TRADE:
            self._trade(e, snapshot, symbol, (price, ts), frame, batch)
            return
        self._book.setdefault(symbol, [None, None])[kind == _OFFER] = price
        touched[symbol] = ts

    def _trade(
        self,
        e: Entry,
        snapshot: bool,
        symbol: str,
        point: PricePoint,
        frame: bytes,
        batch: TickBatch,
    ) -> None:
        if snapshot and not self.snapshot_trades:
            return
        trade_id = e.get(b"1003") or e.get(b"278")
        if trade_id and self._duplicate(symbol, trade_id):
            self.rejects.add("duplicate_trade", frame)
            return
        points = batch.by_symbol.get(symbol)
        if points is None:
            batch.by_symbol[symbol] = [point]
        else:
            points.append(point)
        batch.count += 1

    def _duplicate(self, symbol: str, trade_id: bytes) -> bool:
        key = (symbol, trade_id)
        seen = self._seen
        if key in seen:
            return True
        seen[key] = None
        if len(seen) > self._window:
            del seen[next(iter(seen))]
        return False


def _split(frame: bytes) -> tuple[bytes | None, bytes | None, bytes | None, list[Entry]]:
    """MsgType, SendingTime, message-level Symbol and the NoMDEntries group of one frame."""
    msg_type = sending = msg_symbol = None
    entries: list[Entry] = []
    entry: Entry = {}
    in_group = False
    delimiter: bytes | None = None  # the first tag of the group starts each entry
    for part in frame.split(SOH)[2:-2]:  # 8 and 9 first, 10 and "" last
        tag, _, value = part.partition(b"=")
        if in_group:
            if delimiter is None:
                delimiter = tag
            if tag == delimiter:
                entry = {}
                entries.append(entry)
            entry[tag] = value
        elif tag == b"268":
            in_group = True
        elif tag == b"35":
            msg_type = value
        elif tag == b"52":
            sending = value
        elif tag == b"55":
            msg_symbol = value
    return msg_type, sending, msg_symbol, entries


def _entry_ts(e: Entry, sending_ms: int) -> int | None:
    """Epoch ms of an entry: MDEntryTime (dated by MDEntryDate or SendingTime), else SendingTime."""
    raw_time = e.get(b"273")
    try:
        ts = entry_time_ms(raw_time, sending_ms, e.get(b"272")) if raw_time else sending_ms
    except ValueError:
        return None
    return ts if MIN_TS_MS <= ts <= MAX_TS_MS else None


def _price(raw: bytes | None) -> float | str:
    """The price of an MDEntryPx (270), or the reason it is not a positive finite decimal."""
    if raw is None:
        return "price_missing"
    if not _DECIMAL.fullmatch(raw):
        return "price_not_number"
    price = float(raw)
    if price <= 0.0:
        return "price_not_positive"
    return price if price < _INF else "price_not_finite"
