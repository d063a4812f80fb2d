"""Newline-delimited JSON price feed (docs/protocols.md): bytes -> validated tick batches.

The parser is built once per source and turns a chunk of complete lines into one TickBatch.

Fast path: the whole chunk is decoded by one ``orjson.loads`` call, the lines joined into one
JSON array with the separator ``,0,<LF>``, and it must prove one value per line. Joining with
a plain comma cannot: the two halves of a torn line join into one object, and a line such as
``1,2`` adds the value that keeps the count of values equal to the count of lines. With this
separator, in a chunk whose lines hold no ``[`` or ``]``, the only array is the outer one,
and a separator cannot sit inside a string (a raw LF is invalid there) nor inside an object
(``,0`` is no member): every separator is at the top level. A line that is empty gives two
commas in a row, an error, so every line gives at least one value, and ``2 * lines - 1``
values mean exactly one per line, at the even indices. Any other chunk (arrays in a line,
garbage) is decoded line by line, so one bad line costs only itself. The separator even
saves the line count: the join adds 3 bytes per line break.

That array is first decoded by msgspec into typed structs (``_Tick``: ``symbol`` a str,
``price`` a number in (0, ``max_price``] and no bool, ``timestamp`` an int within the epoch
ms range), and each tick is folded inline into its (symbol, second) bucket: no dict per line,
no tuple per tick, no second pass in the aggregator. Only when the chunk breaks a type or range
rule is it decoded again by orjson and validated tick by tick with a reason per line, so one
bad line costs only itself and gets the same reason whichever path saw it. A grown read (up to
512 KiB while behind, see tcp_json) is decoded ``PIECE_BYTES`` of whole lines at a time into
the read's one fold, each piece proving its own count: the structs of one piece are folded
while they are still in the core's cache.

A line may also carry the venue's top of book: optional ``bid`` and ``ask`` (and
``bid_size``, ``ask_size``) numbers, validated like prices (a bad one rejects the line, as
``bid_<price reason>`` etc.). Such a chunk fails the typed decode at its first quote field
(unknown fields are refused there), so plain lines keep the fast path and lines with quotes
take the per-tick one, which reads the quote of a line only when it has more than three keys.
The last quote per symbol of a chunk becomes the batch's ``BookUpdate`` for the world view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
import orjson

from marketflow.domain.ticks import (
    MAX_AHEAD_MS,
    MAX_PRICE,
    MAX_TS_MS,
    MIN_TS_MS,
    BookUpdate,
    FoldKey,
    PricePoint,
    RejectCounts,
    SecondFold,
    TickBatch,
    fold_points,
    price_reject_reason,
)

_TICK_KEYS = ("symbol", "price", "timestamp")
_QUOTE_KEYS = ("bid", "ask", "bid_size", "ask_size")
_SEPARATOR = b",0,\n"  # see the module docstring: why exactly this
# A grown read is decoded in pieces of about this many bytes of whole lines (_typed_chunk).
PIECE_BYTES = 65536
_Timestamp = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)]


def _decoder(max_price: float) -> msgspec.json.Decoder[list[object]]:
    """The fast path's decoder: ticks (a struct, untracked by the GC: it holds no containers)
    and the separators' zeros. msgspec refuses a bool or a string as a price, and a float
    or a bool as a timestamp; an int price becomes a float."""
    price = Annotated[float, msgspec.Meta(gt=0.0, le=max_price)]
    tick = msgspec.defstruct(
        "Tick",
        [("symbol", str), ("price", price), ("timestamp", _Timestamp)],
        gc=False,
        forbid_unknown_fields=True,  # other fields: the orjson path, which reads every value
    )
    return msgspec.json.Decoder(list[tick | int])  # type: ignore[valid-type]


def _quoted_decoder(max_price: float) -> msgspec.json.Decoder[list[object]]:
    """The fast path for lines that carry a quote too (``bid``/``ask``/sizes, each optional):
    the same rules as the per-line path (each a positive finite number within range; a bool
    or a string refused), so a chunk of quoted lines costs no more than a chunk of ticks."""
    price = Annotated[float, msgspec.Meta(gt=0.0, le=max_price)]
    tick = msgspec.defstruct(
        "QuotedTick",
        [
            ("symbol", str),
            ("price", price),
            ("timestamp", _Timestamp),
            ("bid", price | None, None),
            ("ask", price | None, None),
            ("bid_size", price | None, None),
            ("ask_size", price | None, None),
        ],
        gc=False,
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(list[tick | int])  # type: ignore[valid-type]


def _array_of(piece: bytes) -> bytes:
    """Lines ending in a line break as one JSON array: every line break becomes a separator,
    and a last 0 closes the array after the last one, so ``2 * lines + 1`` values. Blank
    lines, like any other broken rule, fail the decode."""
    return b"".join((b"[", piece.replace(b"\n", _SEPARATOR), b"0]"))


@dataclass(slots=True, eq=False)
class JsonLinesParser:
    """Validates ``{"symbol","price","timestamp"}`` objects of one exchange; counts rejects."""

    exchange: str
    symbols: frozenset[str]
    rejects: RejectCounts
    max_ahead_ms: int = MAX_AHEAD_MS
    max_price: float = MAX_PRICE
    _typed: msgspec.json.Decoder[list[object]] = field(init=False, repr=False)
    _quoted: msgspec.json.Decoder[list[object]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._typed = _decoder(self.max_price)
        self._quoted = _quoted_decoder(self.max_price)

    def parse(self, chunk: bytes, received_ms: int) -> TickBatch:
        """Parse complete lines (the last one may lack its newline)."""
        if chunk.endswith(b"\n"):
            batch = self._typed_chunk(chunk, received_ms)
            if batch is not None:
                return batch
        data = chunk
        if b"\r" in data:
            data = data.replace(b"\r", b"")
        while b"\n\n" in data:
            data = data.replace(b"\n\n", b"\n")
        data = data.strip(b"\n")
        if not data:
            return TickBatch(self.exchange, {}, received_ms, 0)
        if b"[" not in data and b"]" not in data:
            joined = data.replace(b"\n", _SEPARATOR)
            lines = (len(joined) - len(data)) // (len(_SEPARATOR) - 1) + 1
            try:
                values = orjson.loads(b"[" + joined + b"]")
            except orjson.JSONDecodeError:
                pass
            else:
                if len(values) == 2 * lines - 1:
                    return self._validate(values[0::2], received_ms)
        return self._validate(self._decode_lines(data), received_ms)

    def _typed_chunk(self, chunk: bytes, received_ms: int) -> TickBatch | None:
        """The fast path; None when a line breaks a rule (then the chunk is validated per
        tick, and nothing of it was counted yet).

        A chunk beyond ``PIECE_BYTES`` (a grown read) is decoded a piece of whole lines at a
        time, each piece folded into the chunk's one fold: the decoded structs of a piece
        stay in the core's cache while they are folded, and the fold still spans the whole
        read (more ticks per (pair, second) for the aggregator)."""
        by_symbol: dict[str, dict[int, SecondFold]] = {}
        careful: list[object] = []
        quotes: dict[str, object] = {}
        max_ts = min(MAX_TS_MS, received_ms + self.max_ahead_ms)
        lines = 0
        start, size = 0, len(chunk)
        while start < size:
            end = size
            if size - start > 2 * PIECE_BYTES:  # the chunk ends with a line break: found
                end = chunk.find(b"\n", start + PIECE_BYTES) + 1
            piece = chunk[start:end] if start or end < size else chunk
            start = end
            n = self._typed_piece(piece, by_symbol, careful, quotes, max_ts)
            if n < 0:
                return None
            lines += n
        folded: dict[FoldKey, SecondFold] = {
            (symbol, second): f for symbol, secs in by_symbol.items() for second, f in secs.items()
        }
        refused = 0
        for t in careful:
            ts, price = t.timestamp, t.price  # type: ignore[attr-defined]
            if ts > max_ts or t.symbol not in self.symbols:  # type: ignore[attr-defined]
                reason = "timestamp_in_future" if ts > max_ts else "unknown_symbol"
                self.rejects.add(reason, msgspec.json.encode(t))
                refused += 1
                continue
            fold_points(folded, t.symbol, [(price, ts)])  # type: ignore[attr-defined]
        batch = TickBatch(self.exchange, {}, received_ms, lines - refused, folded=folded)
        if quotes:
            batch.books = [
                BookUpdate(self.exchange, sym, t.bid, t.ask, t.timestamp, t.bid_size, t.ask_size)  # type: ignore[attr-defined]
                for sym, t in quotes.items()
            ]
        return batch

    def _typed_piece(
        self,
        piece: bytes,
        by_symbol: dict[str, dict[int, SecondFold]],
        careful: list[object],
        quotes: dict[str, object],
        max_ts: int,
    ) -> int:
        """Decode and fold one piece of whole lines; its line count, or -1 when a line
        breaks a rule. No array can decode into the typed values at all (a tick has no array
        field and unknown fields are refused), so unlike the orjson path no separator can
        hide inside one: ``[`` and ``]`` need no scan here."""
        joined = _array_of(piece)
        lines = (len(joined) - len(piece) - 3) // (len(_SEPARATOR) - 1)
        quoted = False
        try:
            typed = self._typed.decode(joined)
        except msgspec.DecodeError:  # ValidationError is one: a rule broken, or not JSON
            if b'"bid"' not in joined and b'"ask"' not in joined:
                return -1
            try:  # a quoting venue: its first line failed the plain decoder at once
                typed = self._quoted.decode(joined)
            except msgspec.DecodeError:
                return -1
            quoted = True
        if len(typed) != 2 * lines + 1 or not self._fold(typed, by_symbol, careful, max_ts):
            return -1
        if quoted:
            self._last_quotes(typed, quotes, max_ts)
        return lines

    def _last_quotes(self, typed: list[object], last: dict[str, object], max_ts: int) -> None:
        """The last quote per symbol, of the lines the fold accepted (a known symbol, a
        timestamp not ahead): the batch's book updates."""
        symbols = self.symbols
        for t in typed[0:-1:2]:
            if t.bid is not None or t.ask is not None:  # type: ignore[attr-defined]
                sym = t.symbol  # type: ignore[attr-defined]
                if sym in symbols and t.timestamp <= max_ts:  # type: ignore[attr-defined]
                    last[sym] = t

    def _fold(
        self,
        typed: list[object],
        by_symbol: dict[str, dict[int, SecondFold]],
        careful: list[object],
        max_ts: int,
    ) -> bool:
        """Fold the typed ticks (the even indices but the last) into their seconds, per
        symbol then per second (two lookups of a str and an int are cheaper than building
        and hashing a (symbol, second) tuple per tick); False when one of them is a plain
        number (a line ``0``): the chunk is then validated per tick.

        A tick of an unknown symbol, or of a new second where the future starts (``max_ts``),
        goes to ``careful``, handled after the chunk tick by tick in arrival order: the hot
        loop compares a timestamp with ``max_ts`` only for a new second, and checks a symbol
        once a chunk."""
        get_seconds = by_symbol.get
        symbols = self.symbols
        max_sec = max_ts // 1000
        try:
            for t in typed[0:-1:2]:
                ts = t.timestamp  # type: ignore[attr-defined]
                price = t.price  # type: ignore[attr-defined]
                seconds = get_seconds(t.symbol)  # type: ignore[attr-defined]
                if seconds is None:
                    if t.symbol not in symbols:  # type: ignore[attr-defined]
                        careful.append(t)
                        continue
                    seconds = by_symbol[t.symbol] = {}  # type: ignore[attr-defined]
                second = ts // 1000
                f = seconds.get(second)
                if f is None:
                    if second >= max_sec:
                        careful.append(t)
                    else:
                        seconds[second] = [price, price, price, 1, ts, price]
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
        except AttributeError:
            return False
        return True

    def _decode_lines(self, data: bytes) -> list[object]:
        objs: list[object] = []
        for raw in data.split(b"\n"):
            line = raw.strip()
            if not line:
                continue
            try:
                objs.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                self.rejects.add(self._refused_reason(line), line)
        return objs

    def _refused_reason(self, line: bytes) -> str:
        """Why orjson refused ``line``: a tick whose price is beyond a double (1e999) has a
        price reason; anything else is bad_json. Such a line is never accepted."""
        try:
            o = json.loads(line.decode(), parse_int=_json_int, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return "bad_json"
        if type(o) is not dict or any(key not in o for key in _TICK_KEYS):
            return "bad_json"
        return price_reject_reason(o["price"], self.max_price) or "bad_json"

    def _validate(self, objs: list[object], received_ms: int) -> TickBatch:
        by_symbol: dict[str, list[PricePoint]] = {}
        get_points = by_symbol.get
        symbols = self.symbols
        # A timestamp far ahead of our clock would become the "latest" price for good and
        # push the whole window into the past: reject it with the other invalid timestamps.
        max_ts = min(MAX_TS_MS, received_ms + self.max_ahead_ms)
        max_price = self.max_price
        books: dict[str, BookUpdate] = {}
        count = 0
        for o in objs:
            try:
                sym = o["symbol"]  # type: ignore[index]
                price = o["price"]  # type: ignore[index]
                ts = o["timestamp"]  # type: ignore[index]
            except (TypeError, KeyError, IndexError):
                self._reject_shape(o)
                continue
            # The common case in one expression: a float price and an int ms timestamp.
            if not (
                type(price) is float
                and 0.0 < price <= max_price
                and type(ts) is int
                and MIN_TS_MS <= ts <= max_ts
            ):
                reason = self._bad_value(price, ts, max_ts, max_price)
                if reason is not None:
                    self._reject(reason, o)
                    continue
                price = float(price)  # a positive int price
            if len(o) > 3 and not self._quote(o, books, ts):  # type: ignore[arg-type]
                continue
            # A symbol already in this batch was validated; only new ones hit the set.
            points = get_points(sym) if type(sym) is str else None
            if points is None:
                if type(sym) is not str or sym not in symbols:
                    self._reject("unknown_symbol", o)
                    continue
                by_symbol[sym] = [(price, ts)]
            else:
                points.append((price, ts))
            count += 1
        batch = TickBatch(self.exchange, by_symbol, received_ms, count)
        if books:
            batch.books = list(books.values())
        return batch

    def _quote(self, o: dict[str, object], books: dict[str, BookUpdate], ts: int) -> bool:
        """Take the line's quote (``bid``/``ask``/sizes) into ``books``; False when one of
        them is invalid (the line is rejected). A line of an unknown symbol is left to the
        tick rules (``unknown_symbol``)."""
        sym = o["symbol"]
        if type(sym) is not str or sym not in self.symbols:
            return True
        values: list[float | None] = []
        for name in _QUOTE_KEYS:
            v = o.get(name)
            if v is not None:
                reason = price_reject_reason(v, self.max_price)
                if reason is not None:
                    self._reject(f"{name}_{reason.removeprefix('price_')}", o)
                    return False
                v = float(v)  # type: ignore[arg-type]
            values.append(v)
        bid, ask, bid_size, ask_size = values
        if bid is None and ask is None:
            return True  # no quote (sizes alone say nothing)
        books[sym] = BookUpdate(self.exchange, sym, bid, ask, ts, bid_size, ask_size)
        return True

    @staticmethod
    def _bad_value(price: object, ts: object, max_ts: int, max_price: float) -> str | None:
        """Why a tick outside the fast path is invalid; None for a valid int price."""
        reason = price_reject_reason(price, max_price)
        if reason is not None:
            return reason
        if type(ts) is not int or not MIN_TS_MS <= ts <= MAX_TS_MS:
            return "timestamp_invalid"
        if ts > max_ts:
            return "timestamp_in_future"
        return None

    def _reject_shape(self, o: object) -> None:
        reason = "missing_field" if isinstance(o, dict) else "not_an_object"
        self._reject(reason, o)

    def _reject(self, reason: str, o: object) -> None:
        try:
            raw = orjson.dumps(o)
        except TypeError:
            raw = repr(o).encode()
        self.rejects.add(reason, raw)


def _json_int(text: str) -> int | float:
    """An int as orjson reads it: beyond 64 bits it is a double (inf when too large), and
    int() would refuse thousands of digits anyway."""
    return int(text) if len(text) <= 18 else float(text)


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")
