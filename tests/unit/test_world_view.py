"""WorldView: fed by the aggregator (books per batch, feed states per flush), listeners, stats."""

from __future__ import annotations

import asyncio

from marketflow.app.aggregator import Aggregator
from marketflow.app.world_view import WorldView
from marketflow.domain.feeds import FeedStatus
from marketflow.domain.ticks import BookUpdate, TickBatch
from marketflow.settings import PipelineSettings, WorldViewSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000


class Feeds:
    """The running sources' statuses, as bootstrap hands them to the view."""

    def __init__(self, *names: str) -> None:
        self.statuses = {n: FeedStatus(n, "fix", connected=True) for n in names}

    def __call__(self) -> list[FeedStatus]:
        return list(self.statuses.values())


def build(
    feeds: Feeds, clock: ManualClock, max_quote_age_ms: int = 0
) -> tuple[Aggregator, WorldView]:
    agg = Aggregator(
        asyncio.Queue(), FakeCache(), RecordingSink(FakeStore()), PipelineSettings(), clock
    )
    view = WorldView(WorldViewSettings(max_quote_age_ms=max_quote_age_ms), clock, feeds)
    agg.on_books = view.on_books
    agg.on_flush = view.poll
    return agg, view


def fold(agg: Aggregator, *books: BookUpdate) -> None:
    agg.fold(TickBatch(books[0].exchange, {}, T0, 0, books=list(books)))


async def test_link_states_are_read_at_each_flush_and_listeners_hear_of_changes() -> None:
    clock = ManualClock(T0)
    feeds = Feeds("a", "b")
    agg, view = build(feeds, clock)
    changed: list[str] = []
    states: list[tuple[str, str]] = []
    view.subscribe(changed.append)
    view.subscribe_status(lambda venue, state: states.append((venue, state)))
    fold(agg, BookUpdate("a", "BTCUSDT", 100.0, 101.0, T0))
    fold(agg, BookUpdate("b", "BTCUSDT", 100.5, 100.9, T0))
    assert changed == ["BTCUSDT", "BTCUSDT"]
    await agg.flush()
    assert states == [("a", "up"), ("b", "up")]

    feeds.statuses["b"].stale = True  # silent past its timeout
    await agg.flush()
    bbo = view.bbo("BTCUSDT")
    assert bbo is not None
    assert (bbo["bid"], bbo["seq"]) == (
        {"exchange": "a", "price": 100.0, "size": None,
         "timestamp": "2026-11-24T01:10:00.000Z", "age_ms": 0}, 3,
    )  # fmt: skip
    assert bbo["dropped"] == [
        {"exchange": "b", "reason": "stale", "last_update": "2026-11-24T01:10:00.000Z"}
    ]
    assert states[-1] == ("b", "stale")
    assert changed == ["BTCUSDT"] * 3

    await agg.flush()  # nothing changed: nobody is told anything
    assert (len(changed), len(states)) == (3, 3)

    feeds.statuses["b"].stale = False
    feeds.statuses["b"].connected = False
    await agg.flush()  # stale -> down: b stays out, the view does not change
    assert states[-1] == ("b", "down")
    assert len(changed) == 3

    feeds.statuses["b"].connected = True  # back, but its old quote is no evidence
    await agg.flush()
    bbo = view.bbo("BTCUSDT")
    assert bbo is not None
    assert bbo["bid"]["exchange"] == "a"  # type: ignore[index]
    assert bbo["dropped"] == [
        {"exchange": "b", "reason": "awaiting_quote", "last_update": "2026-11-24T01:10:00.000Z"}
    ]
    assert states[-1] == ("b", "up")
    fold(agg, BookUpdate("b", "BTCUSDT", 100.5, 100.9, T0))  # a fresh quote: in again
    bbo = view.bbo("BTCUSDT")
    assert bbo is not None
    assert bbo["bid"]["exchange"] == "b"  # type: ignore[index]
    assert bbo["dropped"] == []

    del feeds.statuses["a"]  # a mode switch stopped the source: down
    await agg.flush()
    assert states[-1] == ("a", "down")
    assert view.venue_states() == {"a": "down", "b": "up"}


async def test_quotes_older_than_the_maximum_age_leave_at_a_flush() -> None:
    clock = ManualClock(T0)
    agg, view = build(Feeds("a", "b"), clock, max_quote_age_ms=2000)
    fold(agg, BookUpdate("a", "BTCUSDT", 100.0, 101.0, T0))
    fold(agg, BookUpdate("b", "BTCUSDT", 99.0, 102.0, T0 + 1500))
    await agg.flush()

    clock.now_ms = T0 + 2500  # a's quote is 2.5 s old
    await agg.flush()
    bbo = view.bbo("BTCUSDT")
    assert bbo is not None
    assert bbo["bid"]["exchange"] == "b"  # type: ignore[index]
    assert bbo["dropped"][0]["reason"] == "quote_age"  # type: ignore[index]
    assert bbo["venues"] == ["b"]


def test_stats_count_book_updates_per_venue_and_crossed_locked() -> None:
    clock = ManualClock(T0)
    agg, view = build(Feeds("a", "b"), clock)
    fold(agg, BookUpdate("a", "BTCUSDT", 100.0, 101.0, T0))
    fold(agg, BookUpdate("a", "BTCUSDT", 100.0, 101.0, T0 + 1))  # a repeat: counted, no change
    fold(agg, BookUpdate("b", "BTCUSDT", 101.0, 102.0, T0))  # locks with a
    fold(agg, BookUpdate("b", "ETHUSDT", 11.0, 12.0, T0))
    fold(agg, BookUpdate("a", "ETHUSDT", 10.0, 10.5, T0))  # crossed by b

    assert view.stats() == {
        "book_updates": {"a": 3, "b": 2},
        "crossed": 1,
        "locked": 1,
        "crossed_total": 1,
        "locked_total": 1,
        "symbols": 2,
    }
    assert view.symbols() == ["BTCUSDT", "ETHUSDT"]
    assert view.bbo("NOPE") is None
    assert view.book("NOPE", 3) is None
