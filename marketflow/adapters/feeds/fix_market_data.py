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

Hot path (``bench.fix_parse``): a 35=X laid out as the protocol says is matched whole by one
precompiled pattern (md_decode.incremental_pattern) and its entries go through one short loop
over the read's frames; any other message, and any entry that is not a plain new/changed
bid, offer or trade, goes through ``_general`` / ``_entry``, the exact rules for every layout.
Tests hold both paths to the same ticks, books and reject counts.

Depth (``depth`` > 1, the subscription's MarketDepth 264): bid and offer entries are price
levels, keyed by MDEntryPx per side with their MDEntrySize (271): 279=0/1 set a level (a 279=1
with MDEntryPositionNo 290 first removes the level that was at that position, the price may
move), 279=2 removes the level at its price, or at its position when it has no price; a level
pushed below ``depth`` is dropped. Every message then takes the general path (``_depth_frame``);
the top-of-book path above is untouched, and stays the one for ``depth`` 1.

Each item carries the session's mark (the next expected inbound MsgSeqNum once its messages are
applied); the batch carries it on to the core, which makes it durable with the ticks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from marketflow.adapters.fix.codec import FixParseError, parse_fields
from marketflow.adapters.fix.md_decode import (
    ENTRY_START,
    INCREMENTALS,
    SOH,
    Entry,
    decode,
    incremental_pattern,
)
from marketflow.adapters.fix.timestamps import entry_time_ms, parse_utc
from marketflow.domain.ticks import (
    MAX_AHEAD_MS,
    MAX_TS_MS,
    MIN_TS_MS,
    BookUpdate,
    Level,
    RejectCounts,
    TickBatch,
)

_DECIMAL = re.compile(rb"-?(?:\d+\.?\d*|\.\d+)")  # FIX Price: no exponent, no inf/nan
_BID, _OFFER, _TRADE = b"0", b"1", b"2"
_DELETE = b"2"
_ACTIONS = (b"0", b"1", b"2")  # a tuple: one-byte values are shared objects, found by identity
_KINDS = (_TRADE, _BID, _OFFER)
# (MDUpdateAction, MDEntryType) the short path takes: the side of the book, or 2 for a trade.
_OPS = {(b"0", _BID): 0, (b"1", _BID): 0, (b"0", _OFFER): 1, (b"1", _OFFER): 1, (b"0", _TRADE): 2}
_INF = float("inf")
_DEDUP_WINDOW = 65536
# What the depth path reads of an entry, after the Entry tuple's tags: MDEntrySize, position.
_ENTRY_TAGS = (279, 269, 55, 270, 273, 272, 1003, 278)
_SIZE, _POSITION = 271, 290

Side = dict[float, float | None]
"""One side of a depth book: price -> size."""


@dataclass(frozen=True, slots=True)
class FixItem:
    """The market-data frames (35=W/35=X) of one read, in MsgSeqNum order, and the mark."""

    frames: list[bytes]
    mark: int | None = None


class FixMarketDataParser:
    """Turns the market-data frames of one read into one TickBatch; counts rejects by reason."""

    __slots__ = (
        "_book", "_depth", "_keys", "_levels", "_published", "_published_depth", "_seen",
        "_symbols", "_window", "exchange", "rejects", "snapshot_trades",
    )  # fmt: skip

    def __init__(
        self,
        exchange: str,
        symbols: Iterable[str],
        rejects: RejectCounts,
        *,
        snapshot_trades_as_ticks: bool = False,
        dedup_window: int = _DEDUP_WINDOW,
        depth: int = 1,
    ) -> None:
        self.exchange = exchange
        self.rejects = rejects
        self.snapshot_trades = snapshot_trades_as_ticks
        self._symbols = {s.encode(): s for s in symbols}
        # The short path's entries: "<279>\x01269=<269>\x0155=<55>" -> (side or 2, symbol).
        self._keys = {
            b"%s\x01269=%s\x0155=%s" % (action, kind, raw): (op, symbol)
            for (action, kind), op in _OPS.items()
            for raw, symbol in self._symbols.items()
        }
        self._book: dict[str, list[float | None]] = {}  # symbol -> [bid, ask]
        self._published: dict[str, tuple[float | None, float | None]] = {}
        self._seen: dict[tuple[str, bytes], None] = {}  # insertion-ordered: oldest first
        self._window = dedup_window
        self._depth = depth
        self._levels: dict[str, tuple[Side, Side]] = {}  # symbol -> (bids, offers), depth > 1
        self._published_depth: dict[str, tuple[tuple[Level, ...], tuple[Level, ...]]] = {}

    def parse(self, item: FixItem | list[bytes], received_ms: int) -> TickBatch:
        """Parse complete, framed 35=W/35=X messages (framing was validated by the reader);
        a plain list of frames (a FIX log replayed from a file) has no mark."""
        frames, mark = (item.frames, item.mark) if isinstance(item, FixItem) else (item, None)
        batch = TickBatch(self.exchange, {}, received_ms, 0, mark=mark)
        self._frames(frames, batch)
        return batch

    def _frames(  # noqa: C901 - the hot loop, one function: a call per message or check costs more
        self, frames: list[bytes], batch: TickBatch
    ) -> None:
        """The common case, kept short: a message of another layout or type goes to
        ``_general``, an unusual entry (a reject, a delete, a correction) to ``_entry``, which
        decide it exactly as for any other layout."""
        if self._depth > 1:
            for frame in frames:
                self._depth_frame(frame, batch)
            return
        keys = self._keys
        book_of = self._book
        published = self._published
        by_symbol = batch.by_symbol
        future = batch.received_ms + MAX_AHEAD_MS
        touched: dict[str, int] = {}
        trades = 0
        patterns = INCREMENTALS
        inf = _INF
        for frame in frames:
            count = frame.count(ENTRY_START)
            pattern = patterns.get(count) or incremental_pattern(count)
            found = None if pattern is None else pattern.fullmatch(frame)
            if found is None:  # not a 35=X laid out as the protocol says
                self._general(frame, batch)
                continue
            values = iter(found.groups(b""))
            try:
                sending_ms = parse_utc(next(values))
            except ValueError:
                self.rejects.add("sending_time_invalid", frame)
                continue
            last_time: bytes | None = None  # the entries of a message share their MDEntryTime
            ts = 0
            bad_ts = True
            # One iterator three times: the entries, three groups at a time, no list between.
            for key, px, etime in zip(values, values, values):  # noqa: B905
                hit = keys.get(key)  # 279, 269 and 55 at once: (side or 2 for a trade, symbol)
                if etime != last_time:
                    last_time = etime
                    t = _entry_ts(etime, None, sending_ms) if etime else _checked(sending_ms)
                    bad_ts = t is None or t > future
                    ts = t or 0
                price = float(px)  # an unsigned decimal (the pattern says so): 0 or inf at worst
                if hit is None or bad_ts or not 0.0 < price < inf:
                    action, kind, sym = key.split(SOH)  # "a", "269=k", "55=s": the pattern's
                    entry = (action, kind[4:], sym[3:], px, etime, None, None, None)
                    self._entry(entry, False, None, sending_ms, frame, batch, touched)
                    continue
                op, symbol = hit
                if op == 2:
                    points = by_symbol.get(symbol)
                    if points is None:
                        by_symbol[symbol] = [(price, ts)]
                    else:
                        points.append((price, ts))
                    trades += 1
                else:
                    book = book_of.get(symbol)
                    if book is None:
                        book = book_of[symbol] = [None, None]
                    book[op] = price
                    touched[symbol] = ts
            if touched:
                for symbol, ts in touched.items():
                    bid, ask = book_of[symbol]
                    if published.get(symbol) != (bid, ask):
                        published[symbol] = (bid, ask)
                        batch.books.append(BookUpdate(self.exchange, symbol, bid, ask, ts))
                touched.clear()
        batch.count += trades

    def _general(self, frame: bytes, batch: TickBatch) -> None:
        """Any message: snapshots, other layouts, rejects."""
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
        touched: dict[str, int] = {}
        for entry in entries:
            self._entry(entry, snapshot, msg_symbol, sending_ms, frame, batch, touched)
        self._publish(touched, batch)

    def _depth_frame(self, frame: bytes, batch: TickBatch) -> None:
        """Any message when the subscription asked for depth: the entries with their sizes
        and positions, through the same rules (``_entry``) as every other path."""
        try:
            fields = parse_fields(frame)
        except FixParseError:
            self.rejects.add("unexpected_msg_type", frame)
            return
        header: dict[int, bytes] = {}
        entries: list[dict[int, bytes]] = []
        first = 0
        in_group = False
        for tag, value in fields:
            if tag == 10:
                break
            if not in_group:
                if tag == 268:
                    in_group = True
                else:
                    header.setdefault(tag, value)
                continue
            if not entries or tag == first:
                first = first or tag
                entries.append({})
            entries[-1][tag] = value
        msg_type = header.get(35)
        if msg_type not in (b"X", b"W"):
            self.rejects.add("unexpected_msg_type", frame)
            return
        try:
            sending_ms = parse_utc(header.get(52) or b"")
        except ValueError:
            self.rejects.add("sending_time_invalid", frame)
            return
        snapshot = msg_type == b"W"
        touched: dict[str, int] = {}
        for e in entries:
            entry = tuple(e.get(t) for t in _ENTRY_TAGS)
            extra = (e.get(_SIZE), e.get(_POSITION))
            self._entry(entry, snapshot, header.get(55), sending_ms, frame, batch, touched, extra)
        self._publish(touched, batch)

    def _set_level(
        self, symbol: str, offer: bool, price: float, action: bytes, extra: tuple[bytes | None, ...]
    ) -> str | None:
        """Set one depth level; the reason when its size or position is invalid."""
        raw_size, raw_pos = extra
        size = None if raw_size is None else _size(raw_size)
        if type(size) is str:
            return size
        assert size is None or isinstance(size, float)
        levels = self._levels.get(symbol)
        if levels is None:
            levels = self._levels[symbol] = ({}, {})
        side = levels[offer]
        if action == b"1" and raw_pos is not None:
            pos = _position(raw_pos)
            if pos is None:
                return "position_invalid"
            ordered = sorted(side, reverse=not offer)
            if pos <= len(ordered) and ordered[pos - 1] != price:
                del side[ordered[pos - 1]]
        side[price] = size
        if len(side) > self._depth:  # pushed below the depth asked for: the venue forgets it
            del side[max(side) if offer else min(side)]
        return None

    def _delete_level(
        self, symbol: str, offer: bool, raw_px: bytes | None, raw_pos: bytes | None
    ) -> None:
        levels = self._levels.get(symbol)
        if levels is None:
            return
        side = levels[offer]
        price = _price(raw_px)
        if type(price) is float:
            side.pop(price, None)
            return
        pos = None if raw_pos is None else _position(raw_pos)
        if pos is not None:
            ordered = sorted(side, reverse=not offer)
            if pos <= len(ordered):
                del side[ordered[pos - 1]]

    def _publish(self, touched: dict[str, int], batch: TickBatch) -> None:
        """A BookUpdate for each symbol whose top of book this message changed."""
        if self._depth > 1:
            self._publish_depth(touched, batch)
            return
        for symbol, ts in touched.items():
            bid, ask = self._book[symbol]
            if self._published.get(symbol) != (bid, ask):
                self._published[symbol] = (bid, ask)
                batch.books.append(BookUpdate(self.exchange, symbol, bid, ask, ts))

    def _publish_depth(self, touched: dict[str, int], batch: TickBatch) -> None:
        """A BookUpdate with the levels of each symbol whose levels this message changed."""
        for symbol, ts in touched.items():
            bid_side, ask_side = self._levels.get(symbol) or ({}, {})
            bids = tuple((p, bid_side[p]) for p in sorted(bid_side, reverse=True))
            asks = tuple((p, ask_side[p]) for p in sorted(ask_side))
            if self._published_depth.get(symbol) == (bids, asks):
                continue
            self._published_depth[symbol] = (bids, asks)
            bid, bid_size = bids[0] if bids else (None, None)
            ask, ask_size = asks[0] if asks else (None, None)
            batch.books.append(
                BookUpdate(self.exchange, symbol, bid, ask, ts, bid_size, ask_size, bids, asks)
            )

    def _entry(  # noqa: C901 - one rule after the other, in the order the reasons are counted
        self,
        e: Entry,
        snapshot: bool,
        msg_symbol: bytes | None,
        sending_ms: int,
        frame: bytes,
        batch: TickBatch,
        touched: dict[str, int],
        extra: tuple[bytes | None, ...] = (None, None),
    ) -> None:
        """One entry; ``extra`` is (MDEntrySize, MDEntryPositionNo) on the depth path."""
        action, kind, sym, px, etime, edate, trade_id, entry_id = e
        if snapshot or action is None:
            action = b"0"
        if action not in _ACTIONS:
            self.rejects.add("bad_update_action", frame)
            return
        symbol = self._symbols.get(sym or msg_symbol or b"")
        if symbol is None:
            self.rejects.add("unknown_symbol", frame)
            return
        if kind not in _KINDS:
            self.rejects.add("entry_type_unsupported", frame)
            return
        ts = _entry_ts(etime, edate, sending_ms) if etime else _checked(sending_ms)
        if ts is None:
            self.rejects.add("timestamp_invalid", frame)
            return
        if ts > batch.received_ms + MAX_AHEAD_MS:
            # Believed, it would pin "latest" and push the window into the past.
            self.rejects.add("timestamp_in_future", frame)
            return
        if snapshot and symbol not in touched:
            self._book[symbol] = [None, None]  # a snapshot replaces the whole book
            if self._depth > 1:
                self._levels[symbol] = ({}, {})
            touched[symbol] = ts
        if action != b"0" and kind == _TRADE:  # a correction or cancel, not a new trade
            self.rejects.add("trade_cancel" if action == _DELETE else "trade_correction", frame)
            return
        if action == _DELETE:
            if self._depth > 1:
                self._delete_level(symbol, kind == _OFFER, px, extra[1])
            else:
                self._book.setdefault(symbol, [None, None])[kind == _OFFER] = None
            touched[symbol] = ts
            return
        price = _price(px)
        if type(price) is str:
            self.rejects.add(price, frame)
            return
        assert isinstance(price, float)
        if kind != _TRADE:
            if self._depth > 1:
                bad = self._set_level(symbol, kind == _OFFER, price, action, extra)
                if bad is not None:
                    self.rejects.add(bad, frame)
                    return
            else:
                self._book.setdefault(symbol, [None, None])[kind == _OFFER] = price
            touched[symbol] = ts
            return
        if snapshot and not self.snapshot_trades:
            return
        trade = trade_id or entry_id
        if trade and self._duplicate(symbol, trade):
            self.rejects.add("duplicate_trade", frame)
            return
        points = batch.by_symbol.get(symbol)
        if points is None:
            batch.by_symbol[symbol] = [(price, ts)]
        else:
            points.append((price, ts))
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


def _entry_ts(raw_time: bytes, raw_date: bytes | None, sending_ms: int) -> int | None:
    """Epoch ms of an MDEntryTime, dated by MDEntryDate (an empty one is none) or SendingTime."""
    try:
        ts = entry_time_ms(raw_time, sending_ms, raw_date or None)
    except ValueError:
        return None
    return ts if MIN_TS_MS <= ts <= MAX_TS_MS else None


def _checked(ts: int) -> int | None:
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


def _size(raw: bytes) -> float | str:
    """An MDEntrySize (271): a non-negative finite decimal, or the reason it is not one."""
    if not _DECIMAL.fullmatch(raw):
        return "size_not_number"
    size = float(raw)
    if size < 0.0:
        return "size_negative"
    return size if size < _INF else "size_not_finite"


def _position(raw: bytes) -> int | None:
    """An MDEntryPositionNo (290): 1 is the top of the book."""
    return int(raw) if raw.isdigit() and 0 < int(raw) <= 10_000 else None
