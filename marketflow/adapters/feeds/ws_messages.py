"""Binance-style combined-stream frames -> validated tick batches and top-of-book updates.

One item is the burst of frames one read of the socket delivered (see websocket.py); it becomes
one TickBatch. Frames, as Binance sends them on ``/stream?streams=...``:

    {"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT","p":"0.001","T":1672515782136,...}}
    {"stream":"btcusdt@bookTicker","data":{"u":1,"s":"BTCUSDT","b":"25.35","B":"31.21",
                                           "a":"25.36","A":"40.66"}}
    {"result":null,"id":1}                      (the reply to a SUBSCRIBE: not market data)

A trade is a tick (price ``p`` at trade time ``T``); a bookTicker is the venue's best bid and
ask. Prices are decimal strings, as Binance sends them: for this protocol only a string is the
right type, and once read it is validated like any price (finite, > 0, <= max_price). A JSON
number or bool where a string belongs is refused (``price_not_string``): a venue that changes
its wire types is a venue whose data we no longer understand. Every refused frame is counted
by reason and the burst goes on.

Each frame is first tried on a fast path: msgspec decodes it straight into typed structs of
Binance's layout (``"stream"`` first) and float() reads the decimals, with a check for what
float() takes that a plain decimal is not (spaces, underscores, non-ASCII digits). Anything
unusual goes to the careful path, which reads the frame again field by field and counts the
reason; the fast path accepts only what the careful path accepts (a property test checks it).

A bookTicker carries no time: its timestamp is the burst's receipt time. Within one burst
only the last quote of each symbol is published, and only when it differs from the last one
published: the books get per-batch, not per-frame, work.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import msgspec
import orjson

from marketflow.domain.ticks import (
    MAX_AHEAD_MS,
    MAX_PRICE,
    MAX_TS_MS,
    MIN_TS_MS,
    BookUpdate,
    PricePoint,
    RejectCounts,
    TickBatch,
    price_reject_reason,
)

WsFrame = str | bytes
"""One WebSocket data frame: text as ``str``, binary as ``bytes`` (refused: Binance sends text)."""

WsItem = list[WsFrame]
"""The frames of one burst: one source-queue item, one TickBatch."""

# A plain decimal with optional sign and exponent. float() alone is too lenient: it takes
# " 1", "1_000", "infinity" and "nan", none of which is a price a venue sends.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)  # \d: 0-9 only
_NOT_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)

Quote = tuple[float, float, float | None, float | None]
"""(bid, ask, bid size, ask size) of one bookTicker."""

_STREAM_PREFIX = '{"stream":"'
_PREFIX_LEN = len(_STREAM_PREFIX)


class _Trade(msgspec.Struct, gc=False):
    s: str
    p: str
    T: int  # msgspec refuses a bool or a float here


class _Ticker(msgspec.Struct, gc=False):
    s: str
    b: str
    a: str
    B: str | None = None
    A: str | None = None


class _TradeFrame(msgspec.Struct, gc=False):
    stream: str
    data: _Trade


class _TickerFrame(msgspec.Struct, gc=False):
    stream: str
    data: _Ticker


# The fast path's decoders: built once (they are immutable and keep no state).
_TRADE = msgspec.json.Decoder(_TradeFrame)
_TICKER = msgspec.json.Decoder(_TickerFrame)


def _plain(value: str) -> bool:
    """No character float() takes that a plain decimal has not: whitespace at the ends, an
    underscore, a non-ASCII digit. With a finite result (nan and inf are not), float()
    accepted exactly a plain decimal."""
    return (
        value.isascii() and "_" not in value and not value[0].isspace() and not value[-1].isspace()
    )


def _fast_decimal(value: str, max_value: float) -> float | None:
    """``value`` as a valid price, or None (the careful path then says why)."""
    try:
        price = float(value)
    except ValueError:
        return None
    if 0.0 < price <= max_value and _plain(value):  # nan fails every comparison; inf the max
        return price
    return None


def _fast_size(value: str | None) -> float | bool | None:
    """A valid size (or None when absent); False when it is not one."""
    if value is None:
        return None
    try:
        size = float(value)
    except ValueError:
        return False
    if 0.0 <= size < math.inf and _plain(value):  # nan fails the comparison
        return size
    return False


def decimal_reason(value: object, max_value: float) -> tuple[float, str | None]:
    """``value`` read as a decimal-string price: (price, None), or (nan, why it is refused)."""
    if type(value) is not str:
        if value is None:
            return math.nan, "price_missing"
        return math.nan, "price_not_string"
    if _DECIMAL.fullmatch(value) is None:
        return math.nan, "price_not_finite" if _NOT_FINITE.fullmatch(value) else "price_not_decimal"
    price = float(value)  # a decimal beyond a double becomes inf: refused just below
    reason = price_reject_reason(price, max_value)
    return (price, None) if reason is None else (math.nan, reason)


def size_of(value: object) -> tuple[float | None, bool]:
    """A quantity string (``B``/``A``): (size, True); a missing one is (None, True); anything
    that is not a finite decimal >= 0 is (None, False)."""
    if value is None:
        return None, True
    if type(value) is not str or _DECIMAL.fullmatch(value) is None:
        return None, False
    size = float(value)
    return (size, True) if math.isfinite(size) and size >= 0.0 else (None, False)


def book_update(
    exchange: str,
    symbol: str,
    quote: Quote,
    timestamp_ms: int,
) -> BookUpdate:
    """The one place a WebSocket quote becomes a BookUpdate: top of book with the sizes
    ``B``/``A`` (None where the venue left them out); a bookTicker has no depth levels."""
    bid, ask, bid_size, ask_size = quote
    return BookUpdate(
        exchange, symbol, bid, ask, timestamp_ms, bid_size=bid_size, ask_size=ask_size
    )


@dataclass(slots=True, eq=False)
class CombinedStreamParser:
    """Parses the frames of one venue; counts every refused frame in ``rejects`` by reason."""

    exchange: str
    symbols: frozenset[str]
    rejects: RejectCounts
    max_ahead_ms: int = MAX_AHEAD_MS
    max_price: float = MAX_PRICE
    # The last quote published per symbol: an unchanged bookTicker is not published again.
    _published: dict[str, Quote] = field(default_factory=dict, init=False, repr=False)

    def parse(self, item: WsItem, received_ms: int) -> TickBatch:
        """One burst of frames -> one batch (trades in ``by_symbol``, quotes in ``books``)."""
        by_symbol: dict[str, list[PricePoint]] = {}
        quotes: dict[str, Quote] = {}
        max_ts = min(MAX_TS_MS, received_ms + self.max_ahead_ms)
        count = 0
        fast = self._fast
        for frame in item:
            added = fast(frame, max_ts, by_symbol, quotes)
            if added is None:
                added = self._careful(frame, max_ts, by_symbol, quotes)
            count += added
        batch = TickBatch(self.exchange, by_symbol, received_ms, count)
        published = self._published
        for sym, quote in quotes.items():
            if published.get(sym) != quote:
                published[sym] = quote
                batch.books.append(book_update(self.exchange, sym, quote, received_ms))
        return batch

    def _fast(
        self,
        frame: WsFrame,
        max_ts: int,
        by_symbol: dict[str, list[PricePoint]],
        quotes: dict[str, Quote],
    ) -> int | None:
        """A well-formed, valid frame in Binance's layout (``"stream"`` first): its ticks
        added (1 or 0); None when anything is unusual, and then ``_careful`` reads the frame
        again and gives the reason. It accepts only what ``_careful`` accepts, with the same
        values (tests/unit/test_ws_messages.py checks both paths agree)."""
        if type(frame) is not str or not frame.startswith(_STREAM_PREFIX):
            return None
        name = frame[_PREFIX_LEN : frame.find('"', _PREFIX_LEN)]
        kind = name.partition("@")[2]
        try:
            if kind == "trade":
                decoded = _TRADE.decode(frame)
                trade = decoded.data
                sym, ts = trade.s, trade.T
                if decoded.stream != name:  # an escape in the name: the careful path reads it
                    return None
                if sym not in self.symbols or not MIN_TS_MS <= ts <= max_ts:
                    return None
                price = _fast_decimal(trade.p, self.max_price)
                if price is None:
                    return None
                points = by_symbol.get(sym)
                if points is None:
                    by_symbol[sym] = [(price, ts)]
                else:
                    points.append((price, ts))
                return 1
            if kind == "bookTicker":
                ticker = _TICKER.decode(frame)
                q = ticker.data
                if ticker.stream != name or q.s not in self.symbols:
                    return None
                bid = _fast_decimal(q.b, self.max_price)
                ask = _fast_decimal(q.a, self.max_price)
                bid_size = _fast_size(q.B)
                ask_size = _fast_size(q.A)
                if bid is None or ask is None or bid_size is False or ask_size is False:
                    return None
                quotes[q.s] = (bid, ask, bid_size, ask_size)
                return 0
        except msgspec.DecodeError:  # not JSON, another layout, a wrong type: careful path
            return None
        return None

    def _careful(
        self,
        frame: WsFrame,
        max_ts: int,
        by_symbol: dict[str, list[PricePoint]],
        quotes: dict[str, Quote],
    ) -> int:
        """Any frame, field by field, each refusal counted with its reason; ticks added."""
        message = self._message(frame)
        if message is None:
            return 0
        kind, data, text = message
        if kind == "trade":
            point = self._trade(data, max_ts, text)
            if point is None:
                return 0
            sym, p = point
            points = by_symbol.get(sym)
            if points is None:
                by_symbol[sym] = [p]
            else:
                points.append(p)
            return 1
        if kind == "bookTicker":
            quoted = self._quote(data, text)
            if quoted is not None:
                quotes[quoted[0]] = quoted[1]
            return 0
        self.rejects.add("unknown_stream", text.encode())
        return 0

    def _message(self, frame: WsFrame) -> tuple[str, dict[str, object], str] | None:
        """(stream kind, data, frame) of a stream message; None for anything else (counted
        unless it is a SUBSCRIBE reply)."""
        if not isinstance(frame, str):
            self.rejects.add("non_text_frame", frame)
            return None
        try:
            msg = orjson.loads(frame)
        except orjson.JSONDecodeError:
            self.rejects.add("bad_json", frame.encode())
            return None
        if type(msg) is not dict:
            self.rejects.add("not_an_object", frame.encode())
            return None
        stream = msg.get("stream")
        data = msg.get("data")
        if type(stream) is not str or type(data) is not dict:
            self._control(msg, frame)
            return None
        return stream.partition("@")[2], data, frame

    def _control(self, msg: dict[str, object], frame: str) -> None:
        """A frame that is no stream message: a SUBSCRIBE reply is fine, an error is counted."""
        if "id" in msg and "result" in msg:
            return  # {"result":null,"id":N}: subscribed (or a LIST_SUBSCRIPTIONS answer)
        if "code" in msg or "error" in msg:
            self.rejects.add("venue_error", frame.encode())
            return
        self.rejects.add("unknown_message", frame.encode())

    def _symbol(self, data: dict[str, object], frame: str) -> str | None:
        sym = data.get("s")
        if type(sym) is not str:
            self.rejects.add("missing_field", frame.encode())
            return None
        if sym not in self.symbols:
            self.rejects.add("unknown_symbol", frame.encode())
            return None
        return sym

    def _trade(
        self, data: dict[str, object], max_ts: int, frame: str
    ) -> tuple[str, PricePoint] | None:
        sym = self._symbol(data, frame)
        if sym is None:
            return None
        price, reason = decimal_reason(data.get("p"), self.max_price)
        if reason is None:
            ts = data.get("T")
            if type(ts) is not int or not MIN_TS_MS <= ts <= MAX_TS_MS:
                reason = "timestamp_invalid"
            elif ts > max_ts:
                reason = "timestamp_in_future"
            else:
                return sym, (price, ts)
        self.rejects.add(reason, frame.encode())
        return None

    def _quote(self, data: dict[str, object], frame: str) -> tuple[str, Quote] | None:
        sym = self._symbol(data, frame)
        if sym is None:
            return None
        bid, reason = decimal_reason(data.get("b"), self.max_price)
        if reason is None:
            ask, reason = decimal_reason(data.get("a"), self.max_price)
            if reason is None:
                bid_size, bid_ok = size_of(data.get("B"))
                ask_size, ask_ok = size_of(data.get("A"))
                if bid_ok and ask_ok:
                    return sym, (bid, ask, bid_size, ask_size)
                reason = "size_invalid"
        self.rejects.add(reason, frame.encode())
        return None
