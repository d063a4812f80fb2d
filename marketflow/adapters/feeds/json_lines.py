"""Newline-delimited JSON price feed (PROTOCOLS.md section 1): bytes -> validated tick batches.

The parser is built once per source and turns a chunk of complete lines into one TickBatch.
Fast path: the whole chunk is decoded by one ``orjson.loads`` call (lines joined into a JSON
array); any chunk that is not clean JSON lines falls back to a line-at-a-time decode so that
one garbage line costs only itself.
"""

from __future__ import annotations

import math

import orjson

from marketflow.domain.ticks import (
    MAX_AHEAD_MS,
    MAX_TS_MS,
    MIN_TS_MS,
    PricePoint,
    RejectCounts,
    TickBatch,
    price_reject_reason,
)

_INF = math.inf


class JsonLinesParser:
    """Validates ``{"symbol","price","timestamp"}`` objects of one exchange; counts rejects."""

    __slots__ = ("exchange", "max_ahead_ms", "rejects", "symbols")

    def __init__(
        self,
        exchange: str,
        symbols: frozenset[str],
        rejects: RejectCounts,
        max_ahead_ms: int = MAX_AHEAD_MS,
    ) -> None:
        self.exchange = exchange
        self.symbols = symbols
        self.rejects = rejects
        self.max_ahead_ms = max_ahead_ms

    def parse(self, chunk: bytes, received_ms: int) -> TickBatch:
        """Parse complete lines (the last one may lack its newline)."""
        data = chunk
        if b"\r" in data:
            data = data.replace(b"\r", b"")
        while b"\n\n" in data:
            data = data.replace(b"\n\n", b"\n")
        data = data.strip(b"\n")
        if not data:
            return TickBatch(self.exchange, {}, received_ms, 0)
        try:
            objs = orjson.loads(b"[" + data.replace(b"\n", b",") + b"]")
        except orjson.JSONDecodeError:
            objs = self._decode_lines(data)
        else:
            # Commas between lines can hide bad framing: two half lines that join into one
            # object, two objects on one line. Every line must hold exactly one value.
            if len(objs) != data.count(b"\n") + 1:
                objs = self._decode_lines(data)
        return self._validate(objs, received_ms)

    def _decode_lines(self, data: bytes) -> list[object]:
        objs: list[object] = []
        for raw in data.split(b"\n"):
            line = raw.strip()
            if not line:
                continue
            try:
                objs.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                self.rejects.add("bad_json", line)
        return objs

    def _validate(self, objs: list[object], received_ms: int) -> TickBatch:
        by_symbol: dict[str, list[PricePoint]] = {}
        get_points = by_symbol.get
        symbols = self.symbols
        # A timestamp far ahead of our clock would become the "latest" price for good and
        # push the whole window into the past: reject it with the other invalid timestamps.
        max_ts = min(MAX_TS_MS, received_ms + self.max_ahead_ms)
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
                and 0.0 < price < _INF
                and type(ts) is int
                and MIN_TS_MS <= ts <= max_ts
            ):
                reason = self._bad_value(price, ts, max_ts)
                if reason is not None:
                    self._reject(reason, o)
                    continue
                price = float(price)  # a positive int price
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
        return TickBatch(self.exchange, by_symbol, received_ms, count)

    @staticmethod
    def _bad_value(price: object, ts: object, max_ts: int) -> str | None:
        """Why a tick outside the fast path is invalid; None for a valid int price."""
        reason = price_reject_reason(price)
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
