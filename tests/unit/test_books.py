"""The cross-venue book logic (domain/books.py): best bid/offer, crossing, locking, drop-outs
by link state and by quote age, depth merge, and seq growing on changes only."""

from __future__ import annotations

from marketflow.domain.books import WorldBooks
from marketflow.domain.ticks import BookUpdate

T0 = 1_764_000_000_000
S = "BTCUSDT"


def quote(
    venue: str, bid: float | None, ask: float | None, ts: int = T0, **kw: object
) -> BookUpdate:
    return BookUpdate(venue, S, bid, ask, ts, **kw)  # type: ignore[arg-type]


def best(books: WorldBooks) -> tuple[object, ...]:
    v = books.views[S]
    bid = None if v.best_bid is None else (v.best_bid.venue, v.best_bid.bids[0][0])
    ask = None if v.best_ask is None else (v.best_ask.venue, v.best_ask.asks[0][0])
    return bid, ask


def test_best_bid_and_offer_come_from_different_venues() -> None:
    books = WorldBooks()
    books.apply(quote("a", 100.0, 101.0))
    books.apply(quote("b", 100.5, 101.5))
    books.apply(quote("c", 99.0, 100.8))

    assert best(books) == (("b", 100.5), ("c", 100.8))
    view = books.views[S]
    assert not view.crossed
    assert not view.locked


def test_crossed_when_best_bid_above_best_ask_and_uncrossed_after() -> None:
    books = WorldBooks()
    books.apply(quote("a", 100.0, 101.0))
    books.apply(quote("b", 101.2, 102.0))  # b bids above a's offer

    view = books.views[S]
    assert view.crossed
    assert not view.locked
    assert best(books) == (("b", 101.2), ("a", 101.0))
    assert (books.crossed_now, books.crossed_total) == (1, 1)

    books.apply(quote("b", 100.5, 102.0))
    assert not view.crossed
    assert (books.crossed_now, books.crossed_total) == (0, 1)


def test_locked_when_best_bid_equals_best_ask() -> None:
    books = WorldBooks()
    books.apply(quote("a", 100.0, 101.0))
    books.apply(quote("b", 101.0, 102.0))

    view = books.views[S]
    assert view.locked
    assert not view.crossed
    assert (books.locked_now, books.locked_total) == (1, 1)


def test_seq_grows_on_changes_only() -> None:
    seen: list[str] = []
    books = WorldBooks(on_change=seen.append)
    assert books.apply(quote("a", 100.0, 101.0))
    assert books.apply(quote("b", 99.0, 102.0))  # not at the top, but in the merged book
    seq = books.views[S].seq
    assert seq == 2

    # the same book again, later: younger, but no change of the view
    assert not books.apply(quote("a", 100.0, 101.0, T0 + 500))
    assert not books.apply(quote("b", 99.0, 102.0, T0 + 600))
    assert books.views[S].seq == seq
    assert books.views[S].venues["a"].timestamp_ms == T0 + 500
    # a size is part of the view
    assert books.apply(quote("a", 100.0, 101.0, T0 + 700, bid_size=2.0))
    assert books.views[S].seq == seq + 1
    assert seen == [S] * (seq + 1)
    assert books.updates == {"a": 3, "b": 2}


def test_venue_down_drops_out_at_once_and_returns_with_its_quote() -> None:
    seen: list[str] = []
    books = WorldBooks(on_change=seen.append)
    books.apply(quote("a", 100.0, 101.0, T0))
    books.apply(quote("b", 100.5, 100.9, T0 + 10))
    assert best(books) == (("b", 100.5), ("b", 100.9))
    seq = books.views[S].seq

    assert books.set_state("b", "down") == [S]
    view = books.views[S]
    assert best(books) == (("a", 100.0), ("a", 101.0))
    assert view.seq == seq + 1
    assert books.dropped(view) == [("b", "down", T0 + 10)]
    assert books.included(view) == ["a"]
    # down -> stale is no change of the view (b is out either way)
    assert books.set_state("b", "stale") == []
    assert books.dropped(view) == [("b", "stale", T0 + 10)]
    # an update from a venue that is out is kept, not shown
    assert not books.apply(quote("b", 100.6, 100.9, T0 + 20))
    assert best(books)[0] == ("a", 100.0)

    assert books.set_state("b", "up") == [S]  # with the quote it sent while out
    assert best(books) == (("b", 100.6), ("b", 100.9))
    assert books.dropped(view) == []
    assert view.seq == seq + 2
    assert seen[-2:] == [S, S]


def test_a_venue_back_up_without_a_fresh_quote_stays_out_until_it_quotes() -> None:
    books = WorldBooks()
    books.apply(quote("a", 100.0, 101.0, T0))
    books.apply(quote("b", 100.5, 100.9, T0 + 10))
    books.set_state("b", "stale")
    # Its link is up again (TCP connected) before it sent anything: the old quote stays out.
    assert books.set_state("b", "up") == []
    view = books.views[S]
    assert best(books) == (("a", 100.0), ("a", 101.0))
    assert books.dropped(view) == [("b", "awaiting_quote", T0 + 10)]
    # The same levels again are a fresh quote: back in.
    assert books.apply(quote("b", 100.5, 100.9, T0 + 30))
    assert best(books) == (("b", 100.5), ("b", 100.9))
    assert books.dropped(view) == []


def test_all_venues_down_leaves_an_empty_view() -> None:
    books = WorldBooks()
    books.apply(quote("a", 100.0, 101.0))
    books.set_state("a", "stale")

    view = books.views[S]
    assert (view.best_bid, view.best_ask) == (None, None)
    assert not view.crossed
    assert not view.locked


def test_stale_by_quote_age_only_when_configured() -> None:
    off = WorldBooks(max_quote_age_ms=0)
    off.apply(quote("a", 100.0, 101.0, T0))
    assert off.expire(T0 + 10**9) == []
    assert best(off)[0] == ("a", 100.0)

    books = WorldBooks(max_quote_age_ms=1000)
    books.apply(quote("a", 100.0, 101.0, T0))
    books.apply(quote("b", 100.5, 101.5, T0 + 800))
    assert books.expire(T0 + 1000) == []  # exactly the limit: still in
    assert books.expire(T0 + 1001) == [S]
    view = books.views[S]
    assert best(books) == (("b", 100.5), ("b", 101.5))
    assert books.dropped(view) == [("a", "quote_age", T0)]
    assert books.expire(T0 + 1002) == []  # already out: no second change

    # a repeat of the same quote brings it back (it is fresh again): a change of the view
    seq = view.seq
    assert books.apply(quote("a", 100.0, 101.0, T0 + 1500))
    assert view.seq == seq + 1
    assert books.dropped(view) == []
    assert best(books) == (("b", 100.5), ("a", 101.0))


def test_depth_merge_best_first_across_venues_capped_at_depth() -> None:
    books = WorldBooks(max_depth=3)
    books.apply(
        quote("a", 100.0, 101.0, bid_size=1.0, ask_size=2.0,
              bids=((100.0, 1.0), (99.5, 3.0), (99.0, 4.0), (98.0, 9.0)),
              asks=((101.0, 2.0), (101.5, 1.0), (102.0, 5.0)))
    )  # fmt: skip
    books.apply(quote("b", 99.8, 101.2, bid_size=0.5, ask_size=0.7))
    books.apply(quote("c", 99.5, 102.0, bid_size=7.0, ask_size=1.0))
    view = books.views[S]
    assert view.venues["a"].bids[-1] == (99.0, 4.0)  # the 4th level is beyond max_depth

    bids, asks = books.merged(view, 4)
    assert bids == [("a", 100.0, 1.0), ("b", 99.8, 0.5), ("c", 99.5, 7.0), ("a", 99.5, 3.0)]
    assert asks == [
        ("a", 101.0, 2.0),
        ("b", 101.2, 0.7),
        ("a", 101.5, 1.0),
        ("a", 102.0, 5.0),
    ]  # tie: larger size
    assert books.merged(view, 2) == (bids[:2], asks[:2])

    books.set_state("a", "down")
    bids, asks = books.merged(view, 4)
    assert [v for v, _, _ in bids + asks] == ["b", "c", "b", "c"]


def test_one_sided_quotes_and_a_venue_that_clears_a_side() -> None:
    books = WorldBooks()
    books.apply(quote("a", 100.0, None))
    books.apply(quote("b", None, 101.0))
    assert best(books) == (("a", 100.0), ("b", 101.0))

    books.apply(quote("a", None, None))  # a deleted both sides
    assert best(books) == (None, ("b", 101.0))


def test_symbols_are_independent() -> None:
    books = WorldBooks()
    books.apply(BookUpdate("a", "BTCUSDT", 100.0, 101.0, T0))
    books.apply(BookUpdate("a", "ETHUSDT", 10.0, 11.0, T0))
    books.apply(BookUpdate("a", "ETHUSDT", 10.5, 11.0, T0))

    assert (books.views["BTCUSDT"].seq, books.views["ETHUSDT"].seq) == (1, 2)
    assert books.set_state("a", "down") == ["BTCUSDT", "ETHUSDT"]
