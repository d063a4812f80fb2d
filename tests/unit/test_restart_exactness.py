"""Issue 9's restart defects, each as the scenario that lost or doubled ticks before.

Driven through the aggregator with fakes of the cache and the store: a "crash" is a new
Aggregator on the same (or a wiped) cache and store, with everything in memory gone.
"""

from __future__ import annotations

import asyncio
import math

from marketflow.app.aggregator import Aggregator
from marketflow.app.queries import PriceQueries
from marketflow.domain.aggregates import MinuteRow
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000  # a minute boundary
S0 = T0 // 1000
PIPE = PipelineSettings()


def batch(exchange: str, *ticks: tuple[str, float, int], mark: int | None = None) -> TickBatch:
    by: dict[str, list[tuple[float, int]]] = {}
    for sym, p, ts in ticks:
        by.setdefault(sym, []).append((p, ts))
    return TickBatch(exchange, by, ticks[-1][2] if ticks else 0, len(ticks), mark=mark)


def second_ticks(
    minute_ms: int, seconds: range, price: float = 10.0
) -> list[tuple[str, float, int]]:
    return [("BTCUSDT", price + s % 7, minute_ms + s * 1000 + 5) for s in seconds]


def new_agg(cache: FakeCache, sink: RecordingSink, clock: ManualClock) -> Aggregator:
    return Aggregator(asyncio.Queue(), cache, sink, PIPE, clock, healthy_sources=lambda: ["ex1"])


async def test_resume_writes_the_minute_that_closed_inside_the_grace_before_a_crash() -> None:
    # Defect 1: 60 cached seconds + empty store + resume + flush wrote no row.
    clock = ManualClock(T0 + 60_500)
    cache, sink = FakeCache(), RecordingSink(FakeStore())
    agg = new_agg(cache, sink, clock)
    agg.fold(batch("ex1", *second_ticks(T0, range(60))))
    await agg.flush()  # seconds in the cache; the minute is inside its grace: no row yet
    assert sink.store.rows == {}
    agg2 = new_agg(cache, sink, clock)  # SIGKILL, restart
    await agg2.resume(sink.store)
    clock.now_ms = T0 + 63_000
    await agg2.flush()
    assert sink.store.rows[("ex1", "BTCUSDT", T0)].count == 60


async def test_partial_redis_never_rewrites_a_stored_row_with_fewer_ticks() -> None:
    # Defect 2: cache seconds 0-19, stored count 40, one new tick -> upserted with count 21.
    clock = ManualClock(T0 + 40_500)
    cache, sink = FakeCache(), RecordingSink(FakeStore())
    agg = new_agg(cache, sink, clock)
    agg.fold(batch("ex1", *second_ticks(T0, range(20))))
    await agg.flush()
    cache.down = True  # Redis down for the next 20 seconds
    agg.fold(batch("ex1", *second_ticks(T0, range(20, 40))))
    await agg.flush(final=True)  # SIGTERM: the partial row (40 ticks) is written
    cache.down = False
    assert sink.store.rows[("ex1", "BTCUSDT", T0)].count == 40
    agg2 = new_agg(cache, sink, clock)
    await agg2.resume(sink.store)
    agg2.fold(batch("ex1", ("BTCUSDT", 99.0, T0 + 50_000)))
    clock.now_ms = T0 + 63_000
    await agg2.flush()
    row = sink.store.rows[("ex1", "BTCUSDT", T0)]
    assert row.count == 41
    assert row.high == 99.0


async def test_restore_loads_whole_minutes_so_history_counts_every_tick() -> None:
    # Defect 3: since = now - retention fell mid-minute: 630 ticks answered as 600.
    clock = ManualClock(T0 + 30_000)
    cache, sink = FakeCache(), RecordingSink(FakeStore())
    agg = new_agg(cache, sink, clock)
    oldest = T0 - 10 * 60_000
    for m in range(11):
        agg.fold(batch("ex1", *second_ticks(oldest + m * 60_000, range(0, 60, 2))))
        await agg.flush()
    clock.now_ms = T0 + 63_000
    await agg.flush(final=True)
    total = sum(r.count for r in sink.store.rows.values())
    assert total == 11 * 30
    clock.now_ms = oldest + 600_000 + 30_000  # the retention now starts mid-minute
    agg2 = new_agg(cache, sink, clock)
    await agg2.resume(sink.store)
    q = PriceQueries(agg2, lambda: sink.store, lambda: ["ex1"], lambda: ["ex1"], ["BTCUSDT"], clock)
    ans = await q.stat("average", "BTCUSDT", "ex1", None, "all")
    assert ans.count == total


async def test_period_after_a_restart_without_cache_counts_the_stored_minutes() -> None:
    # Defect 4: 4 stored minutes of 60 + 1 new tick answered ?period=5m with count 1.
    clock = ManualClock(T0 + 4 * 60_000 + 500)
    store = FakeStore()
    sink = RecordingSink(store)
    agg = new_agg(FakeCache(), sink, clock)
    for m in range(4):
        agg.fold(batch("ex1", *second_ticks(T0 + m * 60_000, range(60))))
    await agg.flush(final=True)
    agg2 = new_agg(FakeCache(), sink, clock)  # embedded cache: lost with the process
    await agg2.resume(store)
    agg2.fold(batch("ex1", ("BTCUSDT", 10.0, T0 + 4 * 60_000 + 100)))
    q = PriceQueries(agg2, lambda: store, lambda: ["ex1"], lambda: ["ex1"], ["BTCUSDT"], clock)
    ans = await q.stat("average", "BTCUSDT", "ex1", 300, "5m")
    assert ans.count == 4 * 60 + 1


async def test_a_tick_older_than_the_restored_range_is_late_not_a_one_tick_row() -> None:
    # Defect 10: a window seeded only from stored rows had no floor: an old tick made a
    # one-tick row that overwrote the full one.
    clock = ManualClock(T0 + 20 * 60_000)
    store = FakeStore()
    old = MinuteRow("ex1", "BTCUSDT", T0, 10.0, 9.0, 11.0, 600, 60_000)
    store.rows[old.key] = old
    recent = MinuteRow("ex1", "BTCUSDT", T0 + 19 * 60_000, 10.0, 9.0, 11.0, 5, 60_000)
    store.rows[recent.key] = recent
    sink = RecordingSink(store)
    agg = new_agg(FakeCache(), sink, clock)
    await agg.resume(store)
    agg.fold(batch("ex1", ("BTCUSDT", 50.0, T0 + 1_000), ("ETHUSDT", 50.0, T0 + 1_000)))
    await agg.flush(final=True)
    assert store.rows[old.key].count == 600
    assert ("ex1", "ETHUSDT", T0) not in store.rows  # a new pair's window has the floor too
    assert agg.late_ticks() == 2


async def test_redis_restarted_empty_is_refilled_with_everything_held() -> None:
    # Defect 2 (NoScriptError path): Redis lost its data while we ran; it must be refilled.
    clock = ManualClock(T0 + 10_500)
    cache, sink = FakeCache(), RecordingSink(FakeStore())
    agg = new_agg(cache, sink, clock)
    agg.fold(batch("ex1", *second_ticks(T0, range(10))))
    await agg.flush()
    cache.wipe()
    agg.fold(batch("ex1", ("BTCUSDT", 10.0, T0 + 10_100)))
    await agg.flush()  # this write finds the cache emptied
    await agg.flush()  # and the next one writes back every second held
    assert sum(b.count for b in cache.seconds.values()) == 11


async def test_marks_are_written_with_the_seconds_and_the_rows_and_restored() -> None:
    clock = ManualClock(T0 + 61_000)
    cache, sink = FakeCache(), RecordingSink(FakeStore())
    agg = new_agg(cache, sink, clock)
    agg.fold(batch("ex1", *second_ticks(T0, range(3)), mark=7))
    assert agg.position("ex1") == 7
    await agg.flush()
    assert cache.marks == {"ex1": (7, T0 + 61_000)}
    clock.now_ms = T0 + 63_000
    agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0 + 62_000), mark=9))
    await agg.flush()
    assert sink.store.marks["ex1"][0] == 9
    agg2 = new_agg(FakeCache(), sink, clock)  # Redis lost: the store's mark is the newest
    await agg2.resume(sink.store)
    assert agg2.position("ex1") == 9


async def test_the_newest_mark_wins_whichever_copy_holds_it() -> None:
    clock = ManualClock(T0 + 1_000)
    cache, store = FakeCache(), FakeStore()
    cache.marks["ex1"] = (50, T0 + 900)  # Redis was written last
    store.marks["ex1"] = (40, T0 + 500)
    cache.marks["ex2"] = (3, T0 + 100)  # a venue that reset its sequence: made later, lower
    store.marks["ex2"] = (900, T0 + 50)
    agg = new_agg(cache, RecordingSink(store), clock)
    await agg.resume(store)
    assert (agg.position("ex1"), agg.position("ex2")) == (50, 3)


async def test_covered_ms_counts_the_time_the_source_was_up() -> None:
    clock = ManualClock(T0)
    cache, sink = FakeCache(), RecordingSink(FakeStore())
    up = {"ex1"}
    agg = Aggregator(asyncio.Queue(), cache, sink, PIPE, clock, healthy_sources=lambda: up)
    for t in range(0, 60_000, 20):
        clock.now_ms = T0 + t
        if t == 30_000:
            up.clear()  # down for 10 s
        if t == 40_000:
            up.add("ex1")
        agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0 + t)))
        await agg.flush()
    clock.now_ms = T0 + 62_500
    await agg.flush()
    row = sink.store.rows[("ex1", "BTCUSDT", T0)]
    assert row.covered_ms == 50_000
    assert not row.complete
    q = PriceQueries(agg, lambda: sink.store, lambda: ["ex1"], lambda: ["ex1"], ["BTCUSDT"], clock)
    ans = await q.stat("average", "BTCUSDT", "ex1", None, "all")
    assert (ans.complete, ans.incomplete_minutes) == (False, 1)


async def test_average_merges_with_fsum_to_the_exact_mean() -> None:
    # Defect 11: a plain float sum over seconds is order dependent (~7e-12 at BTC scale).
    clock = ManualClock(T0 + 59_000)
    agg = new_agg(FakeCache(), RecordingSink(FakeStore()), clock)
    prices = [100_000.0 + (i * 0.1234567) % 3 for i in range(6000)]
    ticks = [("BTCUSDT", p, T0 + (i % 59) * 1000) for i, p in enumerate(prices)]
    agg.fold(batch("ex1", *ticks))
    q = PriceQueries(agg, lambda: FakeStore(), lambda: ["ex1"], lambda: ["ex1"], ["BTCUSDT"], clock)
    ans = await q.stat("average", "BTCUSDT", "ex1", 60, "1m")
    exact = math.fsum(prices) / len(prices)
    assert abs(ans.price - exact) / exact < 1e-12


async def test_period_of_one_second_is_the_current_second_only() -> None:
    # Defect 12: ?period=1s covered 1-2 s of buckets.
    clock = ManualClock(T0 + 5_500)
    agg = new_agg(FakeCache(), RecordingSink(FakeStore()), clock)
    agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0 + 4_900), ("BTCUSDT", 2.0, T0 + 5_100)))
    q = PriceQueries(agg, lambda: FakeStore(), lambda: ["ex1"], lambda: ["ex1"], ["BTCUSDT"], clock)
    ans = await q.stat("average", "BTCUSDT", "ex1", 1, "1s")
    assert (ans.count, ans.price) == (1, 2.0)
    ans = await q.stat("average", "BTCUSDT", "ex1", 2, "2s")
    assert ans.count == 2


async def test_stored_highest_and_lowest_carry_their_minute_not_1970() -> None:
    clock = ManualClock(T0 + 30 * 60_000)
    store = FakeStore()
    for i, (lo, hi) in enumerate([(5.0, 6.0), (4.0, 9.0), (4.5, 8.0)]):
        r = MinuteRow("ex1", "BTCUSDT", T0 + i * 60_000, (lo + hi) / 2, lo, hi, 2, 60_000)
        store.rows[r.key] = r
    agg = new_agg(FakeCache(), RecordingSink(store), clock)
    q = PriceQueries(agg, lambda: store, lambda: ["ex1"], lambda: ["ex1"], ["BTCUSDT"], clock)
    high = await q.stat("highest", "BTCUSDT", "ex1", None, "all")
    low = await q.stat("lowest", "BTCUSDT", "ex1", None, "all")
    assert (high.price, high.timestamp_ms) == (9.0, T0 + 60_000)
    assert (low.price, low.timestamp_ms) == (4.0, T0 + 60_000)


async def test_a_late_tick_only_in_redis_survives_a_restart_the_fuller_second_wins() -> None:
    clock = ManualClock(T0 + 70_000)
    cache, store = FakeCache(), FakeStore()
    sink = RecordingSink(store)
    agg = new_agg(cache, sink, clock)
    agg.fold(batch("ex1", ("BTCUSDT", 10.0, T0 + 10_100)))
    await agg.flush()  # the row (1 tick) and the cache
    store.down = True
    written = dict(store.rows)
    agg.fold(batch("ex1", ("BTCUSDT", 12.0, T0 + 10_200)))  # late, same second
    await agg.flush()  # the cache has 2 ticks in second 10; the rewrite never reached the store
    store.rows = written
    store.down = False
    agg2 = new_agg(cache, sink, clock)
    await agg2.resume(store)
    clock.now_ms = T0 + 71_000
    await agg2.flush()
    row = store.rows[("ex1", "BTCUSDT", T0)]
    assert (row.count, row.high) == (2, 12.0)


async def test_restore_follows_exchange_time_not_the_wall_clock() -> None:
    # A feed (or replay) 20 minutes behind our clock: the retention runs on exchange time,
    # so the restored range must end at the newest exchange second, not at now - retention.
    behind = T0 - 20 * 60_000
    clock = ManualClock(T0)
    cache, sink = FakeCache(), RecordingSink(FakeStore())
    agg = new_agg(cache, sink, clock)
    agg.fold(batch("ex1", *second_ticks(behind, range(60)), ("BTCUSDT", 1.0, behind + 60_100)))
    await agg.flush()  # the closed minute's row is submitted ...
    sink.store.rows.clear()  # ... but never reached the store (the crash came first)
    agg2 = new_agg(cache, sink, clock)
    await agg2.resume(sink.store)
    await agg2.flush()
    assert sink.store.rows[("ex1", "BTCUSDT", behind)].count == 60
