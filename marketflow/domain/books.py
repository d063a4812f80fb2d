"""The cross-venue world view: every venue's book per symbol, combined (pure, no I/O).

Each venue's latest book per symbol (top of book, or depth levels best first, with sizes
where the venue sends them) is kept as it arrives. The view of a symbol is what the venues
*in* the view quote together: the best bid (highest) and best offer (lowest) across them, each
with its venue, the spread and mid, whether the combined quote is ``crossed`` (best bid above
best ask: an arbitrage, or a venue showing an old price) or ``locked`` (equal), and the merged
book (every included venue's levels, best first, in DragonflyBot's Summary shape).

A venue is *out* of the view while the app layer says its link is down or stale
(``set_state``), and, when ``max_quote_age_ms`` > 0, while its quote is older than that
(``expire``): cryptofeed's NBBO keeps a dropped venue's last quote forever, this does not.
Dropped venues stay listed with their last update and the reason. A venue that comes back
is in the view again only with a fresh quote: its link may be up (TCP connected) before it
has sent anything, and its pre-drop quote is no evidence of its book now. Until then it is
listed as ``awaiting_quote``.

``seq`` (per symbol) grows by one exactly when the view changes: an included venue's levels
or sizes change, or a venue enters or leaves the view. An update that repeats a venue's book
refreshes its age but is no change. Cost per update: one comparison with the venue's stored
levels and, on change, one pass over the symbol's venues (O(venues)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from marketflow.domain.ticks import BookUpdate, Level

VenueState = str
"""``"up"``, ``"down"`` (link not connected) or ``"stale"`` (connected but silent)."""
UP, DOWN, STALE = "up", "down", "stale"
QUOTE_AGE = "quote_age"  # the reason a venue with an old quote is out of the view
AWAITING_QUOTE = "awaiting_quote"  # back up after a drop, no quote since


@dataclass(slots=True, eq=False)
class VenueBook:
    """One venue's book of one symbol: levels best first (top of book: one level a side)."""

    venue: str
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    timestamp_ms: int  # the venue's time of its latest update (repeats included)
    expired: bool = False  # older than max_quote_age_ms at the last expire()
    dropped: bool = False  # its venue left the view since this book's last update


@dataclass(slots=True, eq=False)
class SymbolView:
    """The combined view of one symbol; ``best_bid``/``best_ask`` are venue books in it."""

    symbol: str
    venues: dict[str, VenueBook] = field(default_factory=dict)
    seq: int = 0
    best_bid: VenueBook | None = None
    best_ask: VenueBook | None = None
    crossed: bool = False
    locked: bool = False


def levels_of(update: BookUpdate, depth: int) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
    """The update's (bids, asks), best first, at most ``depth`` levels a side."""
    if update.bids or update.asks:
        return update.bids[:depth], update.asks[:depth]
    bids = () if update.bid is None else ((update.bid, update.bid_size),)
    asks = () if update.ask is None else ((update.ask, update.ask_size),)
    return bids, asks


def _bid_key(b: VenueBook) -> tuple[float, float, str]:
    price, size = b.bids[0]
    return (price, size or 0.0, b.venue)


def _ask_key(b: VenueBook) -> tuple[float, float, str]:
    price, size = b.asks[0]
    return (-price, size or 0.0, b.venue)


class WorldBooks:
    """Every venue's books and the combined view per symbol. ``on_change(symbol)`` is called
    once per change of a symbol's view, after ``seq`` grew (keep it cheap)."""

    def __init__(
        self,
        max_depth: int = 10,
        max_quote_age_ms: int = 0,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.max_depth = max_depth
        self.max_quote_age_ms = max_quote_age_ms
        self._on_change = on_change
        self.views: dict[str, SymbolView] = {}
        self.states: dict[str, VenueState] = {}  # a venue never told of is up
        self._symbols_of: dict[str, set[str]] = {}  # venue -> symbols it has quoted
        self.updates: dict[str, int] = {}  # book updates received per venue
        self.crossed_total = 0  # times a symbol's view became crossed
        self.locked_total = 0
        self.crossed_now = 0
        self.locked_now = 0

    # -- input ------------------------------------------------------------------------------

    def apply(self, update: BookUpdate) -> bool:
        """Take one venue's book; True when the symbol's view changed (seq grew)."""
        venue = update.exchange
        self.updates[venue] = self.updates.get(venue, 0) + 1
        bids, asks = levels_of(update, self.max_depth)
        view = self.views.get(update.symbol)
        if view is None:
            view = self.views[update.symbol] = SymbolView(update.symbol)
        vb = view.venues.get(venue)
        if vb is None:
            vb = view.venues[venue] = VenueBook(venue, bids, asks, update.timestamp_ms)
            syms = self._symbols_of.get(venue)
            if syms is None:
                syms = self._symbols_of[venue] = set()
            syms.add(update.symbol)
        else:
            if update.timestamp_ms > vb.timestamp_ms:
                vb.timestamp_ms = update.timestamp_ms
            was_out = vb.expired or vb.dropped
            vb.expired = vb.dropped = False
            if vb.bids == bids and vb.asks == asks and not was_out:
                return False  # a repeat: younger, but the same view
            vb.bids, vb.asks = bids, asks
        if self.states.get(venue, UP) != UP:
            return False  # out of the view: kept for when the venue returns
        self._changed(view)
        return True

    def set_state(self, venue: str, state: VenueState) -> list[str]:
        """The venue's link is ``up``, ``down`` or ``stale``; returns the symbols whose view
        changed (the venue entered or left it)."""
        before = self.states.get(venue, UP)
        self.states[venue] = state
        if (before == UP) == (state == UP):
            return []
        changed: list[str] = []
        for symbol in sorted(self._symbols_of.get(venue, ())):
            view = self.views[symbol]
            vb = view.venues[venue]
            fresh = not vb.expired and not vb.dropped
            if state != UP:  # leaving: its books wait for fresh quotes when it returns
                vb.dropped = True
            if fresh:  # it was in the view and leaves, or it quoted while out and enters
                self._changed(view)
                changed.append(symbol)
        return changed

    def expire(self, now_ms: int) -> list[str]:
        """Drop quotes older than ``max_quote_age_ms`` (0: never); returns the symbols whose
        view changed. Quotes brought back by a new update return in ``apply``."""
        limit = self.max_quote_age_ms
        if limit <= 0:
            return []
        oldest = now_ms - limit
        changed: list[str] = []
        states = self.states
        for view in self.views.values():
            hit = False
            for vb in view.venues.values():
                if not vb.expired and vb.timestamp_ms < oldest:
                    vb.expired = True
                    hit = hit or states.get(vb.venue, UP) == UP
            if hit:
                self._changed(view)
                changed.append(view.symbol)
        return changed

    def _included(self, vb: VenueBook) -> bool:
        return not vb.expired and not vb.dropped and self.states.get(vb.venue, UP) == UP

    def _changed(self, view: SymbolView) -> None:
        """Recompute the best bid/offer (one pass over the venues) and bump ``seq``."""
        best_bid: VenueBook | None = None
        best_ask: VenueBook | None = None
        states = self.states
        for vb in view.venues.values():
            if vb.expired or vb.dropped or states.get(vb.venue, UP) != UP:
                continue
            if vb.bids and (best_bid is None or _bid_key(vb) > _bid_key(best_bid)):
                best_bid = vb
            if vb.asks and (best_ask is None or _ask_key(vb) > _ask_key(best_ask)):
                best_ask = vb
        view.best_bid, view.best_ask = best_bid, best_ask
        crossed = locked = False
        if best_bid is not None and best_ask is not None:
            bid, ask = best_bid.bids[0][0], best_ask.asks[0][0]
            crossed, locked = bid > ask, bid == ask
        if crossed != view.crossed:
            self.crossed_now += 1 if crossed else -1
            self.crossed_total += crossed
        if locked != view.locked:
            self.locked_now += 1 if locked else -1
            self.locked_total += locked
        view.crossed, view.locked = crossed, locked
        view.seq += 1
        if self._on_change is not None:
            self._on_change(view.symbol)

    # -- output -----------------------------------------------------------------------------

    def dropped(self, view: SymbolView) -> list[tuple[str, str, int]]:
        """(venue, reason, last update ms) of the venues with a quote that are out of the view."""
        out: list[tuple[str, str, int]] = []
        for vb in view.venues.values():
            state = self.states.get(vb.venue, UP)
            if state != UP:
                out.append((vb.venue, state, vb.timestamp_ms))
            elif vb.dropped:
                out.append((vb.venue, AWAITING_QUOTE, vb.timestamp_ms))
            elif vb.expired:
                out.append((vb.venue, QUOTE_AGE, vb.timestamp_ms))
        out.sort()
        return out

    def included(self, view: SymbolView) -> list[str]:
        return sorted(vb.venue for vb in view.venues.values() if self._included(vb))

    def merged(self, view: SymbolView, depth: int) -> tuple[list[MergedLevel], list[MergedLevel]]:
        """The merged book: every included venue's levels, best first, ``depth`` a side.
        Ties: the larger size first, then the venue name (stable across calls)."""
        books = [vb for vb in view.venues.values() if self._included(vb)]
        return (
            _merge(((vb.venue, vb.bids) for vb in books), depth, bids=True),
            _merge(((vb.venue, vb.asks) for vb in books), depth, bids=False),
        )


MergedLevel = tuple[str, float, float | None]
"""(venue, price, size) of one level of the merged book."""


def _merge(
    sides: Iterable[tuple[str, tuple[Level, ...]]], depth: int, *, bids: bool
) -> list[MergedLevel]:
    levels = [(venue, price, size) for venue, side in sides for price, size in side]
    sign = -1.0 if bids else 1.0
    levels.sort(key=lambda lv: (sign * lv[1], -(lv[2] or 0.0), lv[0]))
    return levels[:depth]
