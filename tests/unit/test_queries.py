"""PriceQueries over fake windows and a recording minute store, with literal expectations:
what is asked of the store (bounds, since_ms, whether at all), how incomplete minutes add up,
ties, and the 404 messages. Written for mutation testing of marketflow/app/queries.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import pytest

from marketflow.app.aggregator import Aggregator
from marketflow.app.queries import PriceQueries
from marketflow.domain.aggregates import Aggregate, History
from marketflow.domain.errors import NotFound, StoreUnavailable
from marketflow.domain.ports import MinuteStore
from marketflow.domain.window import PairWindow

NOW = 600_500  # second 600, minute 540 s .. 599 s closed, 600 s open


class FakeAgg:
    def __init__(self) -> None:
        self.windows: dict[tuple[str, str], PairWindow] = {}
        self.covered: dict[tuple[str, int], int] = {}

    def window(self, exchange: str, symbol: str) -> PairWindow | None:
        return self.windows.get((exchange, symbol))

    def covered_ms(self, exchange: str, minute_ms: int) -> int:
        return self.covered.get((exchange, minute_ms), 0)

    def add(self, exchange: str, ticks: list[tuple[float, int]]) -> PairWindow:
        w = self.windows.setdefault((exchange, "BTC"), PairWindow(exchange, "BTC"))
        w.add(ticks, NOW)
        return w


class Store:
    def __init__(self, history: History | None = None) -> None:
        self.result = history
        self.calls: list[tuple[str, dict[str, int], int | None]] = []

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> History:
        self.calls.append((symbol, dict(before), since_ms))
        if self.result is None:
            raise StoreUnavailable("down")
        return self.result


def queries(agg: FakeAgg, store: Store, exchanges: list[str]) -> PriceQueries:
    return PriceQueries(
        cast(Aggregator, agg),
        lambda: cast(MinuteStore, store),
        lambda: exchanges,
        lambda: ["ex1", "ex2", "ex3"],
        ["BTC"],
        lambda: NOW,
    )


def test_not_found_messages_name_what_is_missing_truncated() -> None:
    q = queries(FakeAgg(), Store(History(None)), ["ex1"])
    with pytest.raises(NotFound) as e:
        q.latest("S" * 40, None)
    assert str(e.value) == f"unknown symbol {'S' * 32!r}"
    with pytest.raises(NotFound) as e:
        q.latest("BTC", "E" * 70)
    assert str(e.value) == f"unknown exchange {'E' * 64!r}"
    with pytest.raises(NotFound) as e:
        q.latest("BTC", None)
    assert str(e.value) == "no price yet for BTC on any exchange"
    with pytest.raises(NotFound) as e:
        q.latest("BTC", "ex1")
    assert str(e.value) == "no price yet for BTC on ex1"


async def test_stat_not_found_message() -> None:
    q = queries(FakeAgg(), Store(History(None)), ["ex1"])
    with pytest.raises(NotFound) as e:
        await q.stat("highest", "BTC", None, None, "all")
    assert str(e.value) == "no data for BTC on any exchange in all"
    with pytest.raises(NotFound) as e:
        await q.stat("lowest", "BTC", "ex2", 60, "1m")
    assert str(e.value) == "no data for BTC on ex2 in 1m"


def test_latest_skips_exchanges_without_data_and_keeps_the_first_of_a_tie() -> None:
    agg = FakeAgg()
    agg.windows[("ex1", "BTC")] = PairWindow("ex1", "BTC")  # a window with no tick yet
    agg.add("ex2", [(2.0, 590_000)])
    agg.add("ex3", [(3.0, 590_000)])  # the same timestamp: the first in scope stays
    lp, label = queries(agg, Store(), ["ex1", "ex2", "ex3"]).latest("BTC", None)
    assert (lp.exchange, lp.price, label) == ("ex2", 2.0, "all")
    agg.add("ex3", [(4.0, 590_001)])
    lp, _ = queries(agg, Store(), ["ex1", "ex2", "ex3"]).latest("BTC", None)
    assert (lp.exchange, lp.price) == ("ex3", 4.0)


async def test_all_history_asks_the_store_below_each_windows_oldest_minute() -> None:
    agg = FakeAgg()
    agg.add("ex2", [(5.0, 590_000)])
    agg.windows[("ex3", "BTC")] = PairWindow("ex3", "BTC")  # empty window
    stored = History(Aggregate(1.0, 9.0, 20.0, 4, 60_000, 120_000), 2, 1)
    store = Store(stored)
    ans = await queries(agg, store, ["ex1", "ex2", "ex3"]).stat("average", "BTC", None, None, "x")
    # ex1 has no window, ex3 an empty one: everything stored up to now counts for them.
    assert store.calls == [("BTC", {"ex1": NOW + 1, "ex2": 540_000, "ex3": NOW + 1}, None)]
    assert (ans.symbol, ans.exchange, ans.stat, ans.period) == ("BTC", "all", "average", "x")
    assert (ans.price, ans.count, ans.timestamp_ms) == (5.0, 5, NOW)
    assert (ans.partial, ans.incomplete_minutes, ans.complete) == (False, 1 + 1, False)


async def test_a_period_inside_the_window_does_not_read_the_store() -> None:
    agg = FakeAgg()
    agg.add("ex1", [(5.0, 540_000), (7.0, 600_100)])
    store = Store(History(Aggregate(1.0, 1.0, 1.0, 1, 0, 0)))
    q = queries(agg, store, ["ex1"])
    ans = await q.stat("highest", "BTC", "ex1", 61, "61s")  # from 540 s: the window's start
    assert store.calls == []
    assert (ans.price, ans.timestamp_ms, ans.count, ans.exchange) == (7.0, 600_000, 2, "ex1")
    ans = await q.stat("lowest", "BTC", "ex1", 62, "62s")  # from 539 s: before it
    assert store.calls == [("BTC", {"ex1": 540_000}, 539_000)]
    assert (ans.price, ans.timestamp_ms, ans.count) == (1.0, 0, 3)


async def test_store_down_marks_the_answer_partial() -> None:
    agg = FakeAgg()
    agg.add("ex1", [(5.0, 590_000)])
    ans = await queries(agg, Store(None), ["ex1"]).stat("lowest", "BTC", None, None, "all")
    assert (ans.price, ans.count, ans.partial, ans.complete) == (5.0, 1, True, False)
    ans = await queries(agg, Store(History(None)), ["ex1"]).stat("lowest", "BTC", None, 15, "15s")
    assert ans.partial is False


async def test_incomplete_minutes_count_closed_uncovered_minutes_from_the_periods_first() -> None:
    agg = FakeAgg()
    # ex1 holds minutes 480 s, 540 s (closed) and 600 s (open); ex2 holds 540 s.
    agg.add("ex1", [(1.0, 480_000), (1.0, 540_000), (1.0, 600_000)])
    agg.add("ex2", [(1.0, 599_999)])
    agg.covered[("ex1", 480_000)] = 59_999
    agg.covered[("ex1", 540_000)] = 60_000  # complete
    q = queries(agg, Store(History(None, 0, 0)), ["ex1", "ex2"])

    async def incomplete(exchange: str | None, period_s: int | None) -> int:
        return (await q.stat("highest", "BTC", exchange, period_s, "p")).incomplete_minutes

    assert await incomplete("ex1", None) == 1  # 480 s only: 540 s covered, 600 s open
    assert await incomplete(None, None) == 2  # and ex2's 540 s
    assert await incomplete("ex1", 120) == 1  # from 481 s: the minute holding it counts
    assert await incomplete("ex1", 61) == 0  # from 540 s: 480 s is before the period
    assert await incomplete(None, 61) == 1
    assert await incomplete("ex1", 1) == 0  # from 600 s: only the open minute


async def test_incomplete_minutes_of_the_store_add_to_the_windows() -> None:
    agg = FakeAgg()
    agg.add("ex1", [(1.0, 480_000)])
    q = queries(agg, Store(History(Aggregate(2.0, 2.0, 2.0, 1, 0, 0), 3, 3)), ["ex1"])
    ans = await q.stat("average", "BTC", None, None, "all")
    assert ans.incomplete_minutes == 1 + 3
