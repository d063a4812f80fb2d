"""FIX depth end to end: the venue simulator's --depth book through a 264=N session and the
depth parser, forced gaps and resends included, ends equal to the venue's own book."""

from __future__ import annotations

from pathlib import Path

from marketflow.domain.ticks import BookUpdate
from marketflow.settings import DEFAULT_PAIRS
from marketflow.simulator.fix_venue import FixVenue
from tests.integration.test_fix_feed_simulator import Pipeline, until

DEPTH = 4


def last_books(feed: Pipeline) -> dict[str, BookUpdate]:
    out: dict[str, BookUpdate] = {}
    for batch in feed.batches:
        for b in batch.books:
            out[b.symbol] = b
    return out


def venue_book(venue: FixVenue, symbol: str) -> tuple[tuple[tuple[float, float], ...], ...]:
    bids, offers = venue.quotes(symbol)
    return tuple(tuple((float(p), float(s)) for p, s in side) for side in (bids, offers))


async def test_depth_book_matches_the_venue_after_updates_and_resends(tmp_path: Path) -> None:
    async with FixVenue(port=0, rate=400, seed=5, gap_every=40, depth=DEPTH) as venue:
        feed = Pipeline(venue.port, tmp_path, market_depth=DEPTH)
        await until(lambda: feed.collect() > 200)
        session = feed.producer.session
        assert session is not None
        await until(lambda: session.stats.gaps_recovered >= 2)
        venue.rate = 0  # the market stops: the last book each symbol was sent stays

        def matches() -> bool:
            feed.collect()
            books = last_books(feed)
            return set(books) == set(DEFAULT_PAIRS) and all(
                (b.bids, b.asks) == venue_book(venue, s) for s, b in books.items()
            )

        await until(matches)
        for b in last_books(feed).values():
            assert len(b.bids) == len(b.asks) == DEPTH
            assert (b.bid, b.bid_size) == b.bids[0]
            assert b.bids[0][0] < b.asks[0][0]
    await feed.running.stop()
    assert not feed.source.status.rejects.counts


async def test_a_top_of_book_subscriber_of_a_depth_venue_gets_the_top_only(tmp_path: Path) -> None:
    async with FixVenue(port=0, rate=200, seed=6, depth=DEPTH) as venue:
        feed = Pipeline(venue.port, tmp_path)  # market_depth 1: 264=1
        await until(lambda: feed.collect() > 50 and feed.books > 20)
        venue.rate = 0

        def matches() -> bool:
            feed.collect()
            books = last_books(feed)
            return bool(books) and all(
                (b.bid, b.ask) == tuple(float(q) for q in venue._quote(s)) for s, b in books.items()
            )

        await until(matches)
        assert all(b.bids == () and b.bid_size is None for b in last_books(feed).values())
    await feed.running.stop()
