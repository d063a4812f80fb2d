"""Who downstream subscribed to what, and what to send them: the FIX server's use case.

Each logged-on session (an ``MdSink``, the acceptor session of adapters/fix/acceptor.py) has
requests by MDReqID. A request gets one snapshot per symbol at once, then, with updates,
incrementals. Delivery is coalesced: the world view's listener only marks a symbol dirty
(O(1), called on every view change), and ``flush()``, run at the server's cadence, sends each
subscriber one incremental per changed symbol with the level changes since the last one it
sent. Cost grows with subscribers x changed symbols x cadence, not with the tick rate; a
symbol that changed and changed back in one cadence sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from marketflow.domain.md_levels import BID, OFFER, Level, LevelChange, MdRequest, diff_levels

log = logging.getLogger("marketflow.fix_server")

# MDReqRejReason (281) values.
UNKNOWN_SYMBOL = 0
DUPLICATE_REQ_ID = 1
UNSUPPORTED_DEPTH = 5
UNSUPPORTED_UPDATE_TYPE = 6
UNSUPPORTED_ENTRY_TYPE = 8

Sides = tuple[tuple[Level, ...], tuple[Level, ...]]
_EMPTY: Sides = ((), ())


class MdSink(Protocol):
    """A subscriber session as the distribution sees it (the FIX acceptor session)."""

    def snapshot(self, req_id: str, symbol: str, bids: Sequence[Level],
                 offers: Sequence[Level]) -> None: ...  # fmt: skip

    def incremental(self, req_id: str, symbol: str, changes: Sequence[LevelChange]) -> None: ...

    def request_reject(self, req_id: str, reason: int, text: str) -> None: ...


class BookView(Protocol):
    """What is read of the world view (app/world_view.py's WorldView)."""

    def bbo(self, symbol: str) -> dict[str, object] | None: ...

    def book(self, symbol: str, depth: int) -> dict[str, object] | None: ...


@dataclass(slots=True)
class _Subscription:
    req_id: str
    symbols: frozenset[str]
    depth: int
    sides: frozenset[int]
    sent: dict[str, Sides] = field(default_factory=dict)  # symbol -> levels last sent


def _level(raw: object, size_key: str) -> Level:
    assert isinstance(raw, dict)
    size = raw.get(size_key)
    return Level(float(raw["price"]), None if size is None else float(size), str(raw["exchange"]))


class Distribution:
    """Subscriptions of every session, the dirty symbols, and the coalesced flush."""

    def __init__(self, view: BookView, symbols: Sequence[str], max_depth: int) -> None:
        self._view = view
        self.symbols = frozenset(symbols)
        self.max_depth = max_depth
        self._subs: dict[MdSink, dict[str, _Subscription]] = {}
        self._dirty: set[str] = set()
        self.snapshots_sent = 0
        self.incrementals_sent = 0
        self.rejects_sent = 0

    @property
    def sessions(self) -> int:
        return len(self._subs)

    def mark(self, symbol: str) -> None:
        """The world view's listener: the symbol changed (sent at the next flush)."""
        self._dirty.add(symbol)

    def attach(self, sink: MdSink) -> None:
        self._subs.setdefault(sink, {})

    def detach(self, sink: MdSink) -> None:
        self._subs.pop(sink, None)

    def request(self, sink: MdSink, req: MdRequest) -> None:
        """A MarketDataRequest: answered at once (snapshot, or a 35=Y reason)."""
        subs = self._subs.setdefault(sink, {})
        if req.kind == 2:
            if subs.pop(req.req_id, None) is None:
                log.info("fix_server_unsubscribe_unknown req=%s", req.req_id)
            return
        problem = self._problem(req, subs)
        if problem is not None:
            self.rejects_sent += 1
            sink.request_reject(req.req_id, *problem)
            return
        depth = self.max_depth if req.depth == 0 else req.depth
        sides = frozenset(req.sides & {BID, OFFER})
        sub = _Subscription(req.req_id, frozenset(req.symbols), depth, sides)
        for symbol in req.symbols:  # in the order asked
            self._snapshot(sink, sub, symbol)
        if req.kind == 1:
            subs[req.req_id] = sub

    def _problem(self, req: MdRequest, subs: dict[str, _Subscription]) -> tuple[int, str] | None:
        """Why the request cannot be served: MDReqRejReason (281) and Text (58)."""
        if req.kind == 1 and req.req_id in subs:
            return DUPLICATE_REQ_ID, f"MDReqID {req.req_id} is active"
        unknown = [s for s in req.symbols if s not in self.symbols]
        if unknown or not req.symbols:
            return UNKNOWN_SYMBOL, f"unknown symbol: {','.join(unknown) or '(none)'}"
        if not req.sides & {BID, OFFER}:
            return UNSUPPORTED_ENTRY_TYPE, "only bids (0) and offers (1)"
        if req.depth > self.max_depth:
            return UNSUPPORTED_DEPTH, f"MarketDepth above {self.max_depth}"
        if req.kind == 1 and req.update_type == 0:
            return UNSUPPORTED_UPDATE_TYPE, "only incremental refresh (265=1)"
        return None

    def refresh(self, sink: MdSink) -> None:
        """Send every subscription of ``sink`` a fresh snapshot (after a gap fill: the
        incrementals it skipped are not re-sent, they are stale)."""
        for sub in self._subs.get(sink, {}).values():
            for symbol in sorted(sub.symbols):
                self._snapshot(sink, sub, symbol)

    def flush(self) -> None:
        """One incremental per subscriber per changed symbol since the last flush."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        if not self._subs:
            return
        cache: dict[tuple[str, int], Sides] = {}  # read once per symbol and depth per flush
        for sink, subs in self._subs.items():
            for sub in subs.values():
                for symbol in dirty & sub.symbols:
                    key = (symbol, sub.depth)
                    now = cache.get(key)
                    if now is None:
                        now = cache[key] = self._levels(symbol, sub.depth)
                    old = sub.sent.get(symbol, _EMPTY)
                    changes: list[LevelChange] = []
                    for side in (BID, OFFER):
                        if side in sub.sides:
                            changes += diff_levels(side, old[side], now[side])
                    if changes:
                        sub.sent[symbol] = now
                        sink.incremental(sub.req_id, symbol, changes)
                        self.incrementals_sent += 1

    def _snapshot(self, sink: MdSink, sub: _Subscription, symbol: str) -> None:
        bids, offers = self._levels(symbol, sub.depth)
        bids = bids if BID in sub.sides else ()
        offers = offers if OFFER in sub.sides else ()
        sub.sent[symbol] = (bids, offers)
        sink.snapshot(sub.req_id, symbol, bids, offers)
        self.snapshots_sent += 1

    def _levels(self, symbol: str, depth: int) -> Sides:
        """The symbol's levels now: the cross-venue best bid/offer (depth 1, exactly what
        GET /bbo says) or the merged book to ``depth``."""
        if depth == 1:
            bbo = self._view.bbo(symbol)
            if bbo is None:
                return _EMPTY
            bid, ask = bbo.get("bid"), bbo.get("ask")
            return (
                (_level(bid, "size"),) if bid is not None else (),
                (_level(ask, "size"),) if ask is not None else (),
            )
        book = self._view.book(symbol, depth)
        if book is None:
            return _EMPTY
        bids, asks = book.get("bids"), book.get("asks")
        assert isinstance(bids, list)
        assert isinstance(asks, list)
        return (
            tuple(_level(b, "amount") for b in bids),
            tuple(_level(a, "amount") for a in asks),
        )
