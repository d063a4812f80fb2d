"""The world view as the daemon serves it: books from the aggregator, venue status from feeds.

``WorldView`` wraps the pure ``WorldBooks`` (domain/books.py) with the two inputs only the app
layer has: the book updates of each folded batch (``on_books``, called by the aggregator per
batch) and each venue's link state, read from the running sources' ``FeedStatus`` once per
flush (``poll``: O(venues), no per-tick work). Feeds flip ``connected`` / ``stale`` in many
places (connect, EOF, LinkDead, a mode switch that stops a source); one read per flush sees
every change within a flush interval, so no feed needs a hook. The same poll drops quotes
older than ``world_view.max_quote_age_ms`` when configured.

The REST routes (entrypoints/http_worldview.py) and the stream hub read ``bbo`` / ``book``;
the hub's listeners (``subscribe``: symbol changed; ``subscribe_status``: venue up/down/stale)
are called synchronously and must only mark work to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from marketflow.domain.books import DOWN, STALE, UP, SymbolView, VenueBook, WorldBooks
from marketflow.domain.feeds import FeedStatus
from marketflow.domain.ticks import BookUpdate
from marketflow.settings import WorldViewSettings

log = logging.getLogger("marketflow.world_view")

Clock = Callable[[], int]
StatusListener = Callable[[str, str], None]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _no_statuses() -> Iterable[FeedStatus]:
    return ()


def link_state(status: FeedStatus) -> str:
    """``stale`` while the feed says so (silent past its timeout, or dead for it and not
    heard from since), else ``down`` while not connected, else ``up``."""
    if status.stale:
        return STALE
    return UP if status.connected else DOWN


class WorldView:
    """The cross-venue best bid/offer and merged book of every symbol, with change listeners."""

    def __init__(
        self,
        settings: WorldViewSettings,
        clock: Clock,
        statuses: Callable[[], Iterable[FeedStatus]] = _no_statuses,
        *,
        stamp: Callable[[int], str] = _iso,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._statuses = statuses
        self._stamp = stamp
        self._listeners: list[Callable[[str], None]] = []
        self._status_listeners: list[StatusListener] = []
        self.books = WorldBooks(settings.max_depth, settings.max_quote_age_ms, self._notify)
        self._known: dict[str, str] = {}  # venue -> last state seen by poll
        self._next_expire = 0

    # -- inputs ------------------------------------------------------------------------------

    def on_books(self, updates: Iterable[BookUpdate]) -> None:
        """The book updates of one folded batch (the aggregator calls this per batch)."""
        apply = self.books.apply
        for u in updates:
            apply(u)

    def poll(self, now_ms: int | None = None) -> None:
        """Read every running source's link state (and age the quotes): once per flush.
        A venue that stopped running (a mode switch) is down."""
        now = self._clock() if now_ms is None else now_ms
        seen: dict[str, str] = {}
        for st in self._statuses():
            seen[st.name] = link_state(st)
        for venue in self._known:
            seen.setdefault(venue, DOWN)
        for venue, state in seen.items():
            if self._known.get(venue) != state:
                self.set_state(venue, state)
        if self.books.max_quote_age_ms > 0 and now >= self._next_expire:
            self.books.expire(now)
            # aging is checked at a tenth of the limit: a quote leaves within 110% of it
            self._next_expire = now + max(1, self.books.max_quote_age_ms // 10)

    def set_state(self, venue: str, state: str) -> None:
        """Tell the view a venue's link state (``up``/``down``/``stale``) directly."""
        before = self._known.get(venue)
        self._known[venue] = state
        self.books.set_state(venue, state)
        if before != state and not (before is None and state == UP):
            log.info("world_view_venue venue=%s state=%s", venue, state)
        if before != state:
            for listener in self._status_listeners:
                listener(venue, state)

    def _notify(self, symbol: str) -> None:
        for listener in self._listeners:
            listener(symbol)

    # -- what the hub and the REST API call ---------------------------------------------------

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """``listener(symbol)`` after each change of that symbol's view (seq grew)."""
        self._listeners.append(listener)

    def subscribe_status(self, listener: StatusListener) -> None:
        """``listener(venue, "up" | "down" | "stale")`` on each change of a venue's state."""
        self._status_listeners.append(listener)

    def symbols(self) -> list[str]:
        """Every symbol some venue has quoted, sorted."""
        return sorted(self.books.views)

    def venue_states(self) -> dict[str, str]:
        return dict(self._known)

    def bbo(self, symbol: str) -> dict[str, object] | None:
        """The best bid and offer across the venues in the view (GET /bbo/{symbol})."""
        view = self.books.views.get(symbol)
        if view is None:
            return None
        now = self._clock()
        bid = self._side(view.best_bid, True, now)
        ask = self._side(view.best_ask, False, now)
        spread = mid = None
        if view.best_bid is not None and view.best_ask is not None:
            b, a = view.best_bid.bids[0][0], view.best_ask.asks[0][0]
            spread, mid = a - b, (a + b) / 2
        return {
            "symbol": symbol,
            "seq": view.seq,
            "bid": bid,
            "ask": ask,
            "spread": spread,
            "mid": mid,
            "crossed": view.crossed,
            "locked": view.locked,
            "venues": self.books.included(view),
            "dropped": self._dropped(view),
        }

    def book(self, symbol: str, depth: int) -> dict[str, object] | None:
        """The merged book to ``depth`` levels a side, best first (GET /book/{symbol}):
        DragonflyBot's Summary shape plus ``seq`` and the dropped venues."""
        view = self.books.views.get(symbol)
        if view is None:
            return None
        bids, asks = self.books.merged(view, depth)
        spread = asks[0][1] - bids[0][1] if bids and asks else None
        return {
            "symbol": symbol,
            "seq": view.seq,
            "spread": spread,
            "bids": [{"exchange": v, "price": p, "amount": s} for v, p, s in bids],
            "asks": [{"exchange": v, "price": p, "amount": s} for v, p, s in asks],
            "crossed": view.crossed,
            "locked": view.locked,
            "dropped": self._dropped(view),
        }

    def stats(self) -> dict[str, object]:
        """For metrics: book updates received per venue (a counter), crossed/locked symbols
        now (gauges) and times a symbol became crossed/locked (counters)."""
        b = self.books
        return {
            "book_updates": dict(b.updates),
            "crossed": b.crossed_now,
            "locked": b.locked_now,
            "crossed_total": b.crossed_total,
            "locked_total": b.locked_total,
            "symbols": len(b.views),
        }

    def _side(self, vb: VenueBook | None, bid: bool, now: int) -> dict[str, object] | None:
        if vb is None:
            return None
        price, size = vb.bids[0] if bid else vb.asks[0]
        return {
            "exchange": vb.venue,
            "price": price,
            "size": size,
            "timestamp": self._stamp(vb.timestamp_ms),
            "age_ms": max(0, now - vb.timestamp_ms),
        }

    def _dropped(self, view: SymbolView) -> list[dict[str, object]]:
        return [
            {"exchange": venue, "reason": reason, "last_update": self._stamp(ts)}
            for venue, reason, ts in self.books.dropped(view)
        ]
