"""Aggregator bookkeeping with literal expectations: coverage per minute, resume positions,
queue delay peaks, books, the cache outage backoff and refill. Written for mutation testing
of marketflow/app/aggregator.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from marketflow.app import aggregator as aggregator_module
from marketflow.app.aggregator import FULL_SWEEP_MS, Aggregator
from marketflow.domain.aggregates import MinuteRow, SecondBucket
from marketflow.domain.ticks import BookUpdate, TickBatch
from marketflow.domain.window import PairWindow
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000  # a minute start


def make(
    clock: ManualClock, healthy: tuple[str, ...] = ()
) -> tuple[Aggregator, FakeCache, RecordingSink]:
    cache = FakeCache()
    sink = RecordingSink(FakeStore())
    agg = Aggregator(
        asyncio.Queue(), cache, sink, PipelineSettings(), clock,
        healthy_sources=lambda: healthy, rng=random.Random(1),
    )  # fmt: skip
    return agg, cache, sink


def batch(exchange: str, ts: int, received_ms: int, mark: int | None = None) -> TickBatch:
    b = TickBatch(exchange, {"BTCUSDT": [(1.0, ts)]}, received_ms, 1)
    b.mark = mark
    return b


async def test_coverage_credits_each_minute_the_time_a_source_was_healthy() -> None:
    clock = ManualClock(T0 + 50_000)
    agg, _, _ = make(clock, healthy=("ex1", "ex2"))
    clock.now_ms = T0 + 130_000  # 50 s .. 130 s: 10 s of minute 0, 60 of minute 1, 10 of 2
    await agg.flush()
    assert agg.coverage == {
        ex: {T0: 10_000, T0 + 60_000: 60_000, T0 + 120_000: 10_000} for ex in ("ex1", "ex2")
    }
    clock.now_ms = T0 + 135_000
    await agg.flush()
    assert agg.coverage["ex1"][T0 + 120_000] == 15_000
    await agg.flush()  # no time passed: nothing credited
    assert agg.coverage["ex1"][T0 + 120_000] == 15_000
    assert agg.covered_ms("ex1", T0 + 60_000) == 60_000
    assert agg.covered_ms("ex1", T0 + 120_000) == 15_000
    assert agg.covered_ms("ex3", T0) == 0
    agg.coverage["ex1"][T0] = 70_000
    assert agg.covered_ms("ex1", T0) == 60_000  # capped at a whole minute


async def test_coverage_older_than_the_window_is_forgotten() -> None:
    retention_ms = PipelineSettings().window_retention_s * 1000
    clock = ManualClock(T0)
    agg, _, _ = make(clock, healthy=("ex1",))
    floor = T0 + 1000 - retention_ms - 120_000  # the retention plus 120 s before the flush
    agg.coverage["ex1"] = {floor - 1: 1, floor: 2}
    clock.now_ms = T0 + 1000
    await agg.flush()
    assert sorted(agg.coverage["ex1"]) == [floor, T0]


def test_positions_fold_over_marks_and_the_newest_folded_wins() -> None:
    agg, _, _ = make(ManualClock(T0))
    assert agg.position("fix") is None
    agg.restore_position("fix", (7, 123))
    assert agg.position("fix") == 7
    agg.fold(batch("fix", T0, T0, mark=9))
    agg.fold(batch("fix", T0, T0))  # no mark: the position stays
    assert agg.position("fix") == 9


async def test_flush_stamps_marks_with_the_flush_time_and_sends_them_with_rows() -> None:
    clock = ManualClock(T0 + 1000)
    agg, cache, _ = make(clock)
    agg.fold(batch("fix", T0, T0, mark=5))
    await agg.flush()
    assert agg.marks == {"fix": (5, T0 + 1000)}
    assert cache.marks == {"fix": (5, T0 + 1000)}
    assert agg.position("fix") == 5


def test_fold_counts_ticks_keeps_books_and_queue_delay_peaks() -> None:
    clock = ManualClock(T0 + 300)
    agg, _, _ = make(clock)
    book = BookUpdate("fix", "BTCUSDT", 1.0, 2.0, T0)
    b = batch("ex1", T0, T0 + 100)
    b.books = [book]
    agg.fold(b)
    agg.fold(batch("ex1", T0, T0 + 250))
    assert agg.ticks_folded == 2
    assert agg.books == {("fix", "BTCUSDT"): book}
    assert agg.queue_delay_ms == 50  # the last batch
    assert agg._delay_peak_ms == 200  # the highest since the last flush


async def test_flush_publishes_the_peak_delay_and_resets_it() -> None:
    clock = ManualClock(T0 + 300)
    agg, _, _ = make(clock)
    agg.fold(batch("ex1", T0, T0 + 100))
    await agg.flush()
    assert agg.queue_delay_peak_ms == 200
    await agg.flush()
    assert agg.queue_delay_peak_ms == 0
    assert agg.flushes == 2
    assert agg.loss_bound_ms() == PipelineSettings().flush_interval_ms


async def test_drain_folds_what_is_queued_and_survives_a_bad_batch() -> None:
    agg, _, _ = make(ManualClock(T0))
    queue = agg._fanin
    queue.put_nowait(batch("ex1", T0, T0))
    queue.put_nowait(TickBatch("ex1", {"BTCUSDT": None}, T0, 1))  # type: ignore[dict-item]
    queue.put_nowait(batch("ex2", T0, T0))
    assert agg.drain() == 3
    assert queue.empty()
    assert sorted(w.exchange for w in agg.all_windows()) == ["ex1", "ex2"]
    assert agg.window("ex2", "BTCUSDT") is not None
    assert agg.window("ex9", "BTCUSDT") is None


async def test_cache_outage_backs_off_and_writes_only_what_it_missed_when_it_returns() -> None:
    """A cache back with its data (a timeout, a dropped connection) gets what the failed and
    the skipped writes carried, newest value per second, with every mark: not a refill."""
    clock = ManualClock(T0 + 100)
    agg, cache, _ = make(clock)
    agg.fold(batch("ex1", T0, T0, mark=1))
    await agg.flush()
    assert cache.writes == 1
    cache.down = True
    agg.fold(batch("ex1", T0 + 1000, T0 + 1000, mark=2))
    await agg.flush()  # fails
    assert (agg.cache_up, agg.cache_error) == (False, "fake cache is down")
    retry_at = agg._cache_retry_at
    assert T0 + 100 + 500 <= retry_at <= T0 + 100 + 1000  # 1 s x jitter 0.5 .. 1.0
    cache.down = False
    clock.now_ms = retry_at - 1
    agg.fold(batch("ex1", T0 + 1500, T0 + 1500))  # the same second again
    agg.fold(batch("ex1", T0 + 2000, T0 + 2000))
    await agg.flush()  # skipped: not before the retry time
    assert cache.writes == 1
    clock.now_ms = retry_at
    await agg.flush()
    assert (agg.cache_up, agg.cache_error, cache.writes) == (True, "", 2)
    assert cache.wholes == [False, False]
    sec = T0 // 1000
    assert sorted(cache.carried[1]) == [("ex1", "BTCUSDT", sec + 1), ("ex1", "BTCUSDT", sec + 2)]
    assert cache.seconds[("ex1", "BTCUSDT", sec + 1)].count == 2  # the newest value
    assert cache.latest[("ex1", "BTCUSDT")].timestamp_ms == T0 + 2000
    assert cache.marks["ex1"][0] == 2
    writes = cache.writes
    await agg.flush()
    assert cache.writes == writes  # nothing owed any more


async def test_a_cache_owing_more_than_the_limit_is_refilled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregator_module, "UNWRITTEN_LIMIT", 2)
    clock = ManualClock(T0 + 100)
    agg, cache, _ = make(clock)
    agg.fold(batch("ex1", T0, T0))
    await agg.flush()
    cache.down = True
    for i in (1, 2, 3):
        agg.fold(batch("ex1", T0 + 1000 * i, T0 + 1000 * i))
        await agg.flush(final=True)  # forced: each one tried, each one fails
    assert agg._refill
    assert not agg._unwritten
    cache.down = False
    await agg.flush(final=True)
    assert cache.wholes == [False, True]
    assert sorted(s for (_, _, s) in cache.seconds) == [T0 // 1000 + i for i in range(4)]


async def test_what_is_owed_for_pairs_handed_over_is_never_written() -> None:
    clock = ManualClock(T0 + 100)
    agg, cache, _ = make(clock)
    cache.down = True
    agg.fold(TickBatch("ex1", {"A": [(1.0, T0)], "B": [(2.0, T0)]}, T0, 2))
    await agg.flush()
    assert agg.drop(lambda sym: sym == "A", []) == 1
    cache.down = False
    await agg.flush(final=True)
    assert cache.carried == [[("ex1", "B", T0 // 1000)]]
    assert set(cache.latest) == {("ex1", "B")}


async def test_a_cache_that_lost_its_data_is_refilled_on_the_next_flush() -> None:
    clock = ManualClock(T0 + 100)
    agg, cache, _ = make(clock)
    agg.fold(batch("ex1", T0, T0))
    await agg.flush()
    cache.wipe()  # the next write reports the loss
    agg.fold(batch("ex1", T0 + 2000, T0 + 2000))
    await agg.flush()
    assert sorted(s for (_, _, s) in cache.seconds) == [T0 // 1000 + 2]
    await agg.flush()  # the refill: everything held
    assert sorted(s for (_, _, s) in cache.seconds) == [T0 // 1000, T0 // 1000 + 2]
    writes = cache.writes
    await agg.flush()  # and then nothing more to write
    assert cache.writes == writes


async def test_the_first_write_to_an_empty_cache_is_a_refill_only_after_a_restore() -> None:
    """A daemon that restored nothing holds only what its first write carries: that the
    cache has no sentinel yet (a fresh Redis) asks for no refill. One that restored windows
    holds what the cache may lack."""
    for restored in (False, True):
        clock = ManualClock(T0 + 100)
        agg, cache, _ = make(clock)
        if restored:
            seeded = FakeCache()
            seeded.seconds[("ex1", "BTCUSDT", T0 // 1000 - 5)] = SecondBucket(
                "ex1", "BTCUSDT", T0 // 1000 - 5, 1.0, 1.0, 1.0, 1
            )
            agg._cache = seeded
            await agg.resume(FakeStore())
            agg._cache = cache
        agg.fold(batch("ex1", T0, T0))
        cache.lost = True
        await agg.flush()
        await agg.flush()
        assert cache.wholes == ([False, True] if restored else [False])


async def test_a_cache_back_from_an_outage_emptied_is_refilled_once() -> None:
    """The write that gets through carries what was owed and finds the cache emptied (a
    Redis restarted): one refill follows, and no second one (at 500 x 10 a refill is 3
    million seconds)."""
    clock = ManualClock(T0 + 100)
    agg, cache, _ = make(clock)
    agg.fold(batch("ex1", T0, T0))
    await agg.flush()
    cache.down = True
    agg.fold(batch("ex1", T0 + 1000, T0 + 1000))
    await agg.flush()
    assert not agg.cache_up
    cache.down = False
    cache.wipe()
    cache.lost = True
    await agg.flush(final=True)  # forced (no backoff): what was owed, and the loss found
    assert agg.cache_up
    await agg.flush()  # the refill
    assert cache.wholes == [False, False, True]  # a refill says it holds every second
    assert sorted(s for (_, _, s) in cache.seconds) == [T0 // 1000, T0 // 1000 + 1]
    writes = cache.writes
    await agg.flush()
    assert cache.writes == writes  # no second refill


async def test_a_sweep_visits_only_windows_whose_pending_minute_has_closed() -> None:
    visits: list[str] = []

    class Counting(PairWindow):
        __slots__ = ()

        def closed_minutes(self, *args: object, **kwargs: object) -> list[MinuteRow]:
            visits.append(self.symbol)
            return super().closed_minutes(*args, **kwargs)  # type: ignore[arg-type]

    clock = ManualClock(T0 + 55_000)
    agg, _, sink = make(clock)
    await agg.flush()  # the first sweep is a full one (nothing held yet); next at +10 s
    for sym in ("A", "B"):
        agg.windows.setdefault("ex", {})[sym] = Counting("ex", sym)
    agg.fold(TickBatch("ex", {"A": [(1.0, T0 + 1_000)], "B": [(2.0, T0 + 60_500)]}, T0, 2))
    await agg.flush()
    assert visits == []  # A's minute T0 and B's minute T0+60 s are pending, neither closed
    clock.now_ms = T0 + 62_500  # minute T0 closed (grace 2 s)
    await agg.flush()
    assert visits == ["A"]  # B has nothing closed: not visited
    assert [(r.symbol, r.minute_ms) for r in sink.submitted] == [("A", T0)]
    visits.clear()
    clock.now_ms = T0 + 63_000
    await agg.flush()
    assert visits == []  # nothing closed since: no window visited
    # A late tick for the closed minute makes it due again at once; only its window is visited.
    agg.fold(TickBatch("ex", {"A": [(0.5, T0 + 2_000)]}, T0, 1))
    await agg.flush()
    assert visits == ["A"]
    assert [(r.symbol, r.count, r.low) for r in sink.submitted[1:]] == [("A", 2, 0.5)]
    visits.clear()
    clock.now_ms = T0 + 55_000 + FULL_SWEEP_MS  # the full sweep: every window once
    await agg.flush()
    assert sorted(visits) == ["A", "B"]


async def test_the_flusher_writes_as_soon_as_the_queue_is_drained_not_at_the_ceiling() -> None:
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    cache = FakeCache()
    clock = ManualClock(T0)
    pipeline = PipelineSettings(flush_interval_ms=10_000, flush_min_interval_ms=0)
    agg = Aggregator(fanin, cache, RecordingSink(FakeStore()), pipeline, clock)
    tasks = [asyncio.create_task(agg.consume()), asyncio.create_task(agg.run_flusher())]
    try:
        await asyncio.sleep(0.05)  # the first (empty) flush is done; now the ceiling is 10 s
        before = cache.writes
        fanin.put_nowait(batch("ex", T0, T0))
        async with asyncio.timeout(5):  # half the ceiling: only an idle flush can do it
            while cache.writes == before:  # noqa: ASYNC110 - a poll of a fake, by design
                await asyncio.sleep(0.001)
        assert cache.latest[("ex", "BTCUSDT")].price == 1.0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_backlog_is_folded_in_slices_that_let_the_loop_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregator_module, "FOLD_SLICE_S", 0.0)  # yield after every batch
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    agg = Aggregator(
        fanin, FakeCache(), RecordingSink(FakeStore()), PipelineSettings(), ManualClock(T0)
    )
    for i in range(50):
        fanin.put_nowait(batch("ex", T0 + i, T0))
    seen: list[int] = []

    async def other_task() -> None:
        while True:
            seen.append(agg.ticks_folded)
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    consumer = asyncio.create_task(agg.consume())
    await asyncio.wait_for(fanin.join(), 5)
    for t in (other, consumer):
        t.cancel()
    await asyncio.gather(other, consumer, return_exceptions=True)
    assert agg.ticks_folded == 50
    between = {n for n in seen if 0 < n < 50}
    assert len(between) > 10  # the other task ran while the backlog was being folded


async def test_a_feed_whose_batches_queue_past_the_grace_keeps_its_closed_minute_unpacked() -> None:
    clock = ManualClock(T0)
    agg, _, sink = make(clock)
    old = T0 - 600_000
    for k in range(3):  # each batch read 5 s before it is folded (queues behind a backlog)
        clock.now_ms = T0 + k * 100
        agg.fold(batch("ex", old + k * 1000, clock.now_ms - 5_000))
        await agg.flush()
    w = agg.window("ex", "BTCUSDT")
    assert w is not None
    # Folded into at every flush: still a feed sending that minute, so its seconds stay in
    # the dict (packing them would mean unpacking them again at the next batch).
    assert (w.packed, len(w.seconds), w.active_ms) == ({}, 3, T0 + 200)
    # rewritten at most once per REWRITE_GAP_MS (200): at +0 and +200, not at +100
    assert [r.count for r in sink.submitted] == [1, 3]


async def test_a_minute_still_fed_after_it_closed_is_rewritten_once_the_gap_has_passed() -> None:
    """Postponed, it stays pending and the sweep comes back to it by itself, with no new
    tick to make it pending again; a final flush writes it at once."""
    clock = ManualClock(T0)
    agg, _, sink = make(clock)
    old = T0 - 600_000
    agg.fold(batch("ex", old, T0 - 5_000))
    await agg.flush()
    assert [r.count for r in sink.submitted] == [1]
    clock.now_ms = T0 + 100
    agg.fold(batch("ex", old + 1000, T0 + 100 - 5_000))
    await agg.flush()
    clock.now_ms = T0 + 150
    await agg.flush()
    assert [r.count for r in sink.submitted] == [1]  # not due before +200
    clock.now_ms = T0 + 300
    await agg.flush()  # the retry, nothing new folded
    assert [r.count for r in sink.submitted] == [1, 2]
    clock.now_ms = T0 + 350
    agg.fold(batch("ex", old + 2000, T0 + 350 - 5_000))
    await agg.flush(final=True)
    assert [r.count for r in sink.submitted] == [1, 2, 3]
