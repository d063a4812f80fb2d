"""Aggregator edges with literal expectations: parser-folded batches make windows like single
ticks do, windows sharing a pending minute are all swept, the closing boundary is exact, a
flush without a sweep closes nothing, marks alone reach the cache, and what the log says.
Written for mutation testing of marketflow/app/aggregator.py."""

from __future__ import annotations

import asyncio
import logging
import random
from types import SimpleNamespace

import pytest

from marketflow import loop_slices
from marketflow.app import aggregator as aggregator_module
from marketflow.app.aggregator import Aggregator
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000  # a minute start
S0 = T0 // 1000


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


def folded(exchange: str, received_ms: int, *seconds: tuple[str, int, list[float]]) -> TickBatch:
    """A batch as the JSON fast path makes it: (symbol, second) -> [low, high, total, count,
    newest_ts, price_at_newest]."""
    b = TickBatch(exchange, {}, received_ms, 0)
    for symbol, second, fold in seconds:
        b.folded[(symbol, second)] = fold
        b.count += int(fold[3])
    return b


async def test_a_folded_batch_makes_its_window_and_its_seconds_reach_cache_and_rows() -> None:
    clock = ManualClock(T0 + 2_000)
    agg, cache, sink = make(clock)
    agg.fold(
        folded(
            "ex1", T0 + 1_900,
            ("BTCUSDT", S0, [1.0, 3.0, 4.0, 2.0, T0 + 900.0, 3.0]),
            ("BTCUSDT", S0 + 1, [2.0, 2.0, 2.0, 1.0, T0 + 1_500.0, 2.0]),
            ("ETHUSDT", S0 + 1, [5.0, 5.0, 5.0, 1.0, T0 + 1_100.0, 5.0]),
        )
    )  # fmt: skip
    w = agg.window("ex1", "BTCUSDT")
    assert w is not None
    assert (w.exchange, w.symbol) == ("ex1", "BTCUSDT")
    assert agg.ticks_folded == 4
    await agg.flush()
    assert cache.latest[("ex1", "BTCUSDT")].price == 2.0
    assert cache.latest[("ex1", "ETHUSDT")].price == 5.0
    assert {k: (b.low, b.high, b.count) for k, b in cache.seconds.items()} == {
        ("ex1", "BTCUSDT", S0): (1.0, 3.0, 2),
        ("ex1", "BTCUSDT", S0 + 1): (2.0, 2.0, 1),
        ("ex1", "ETHUSDT", S0 + 1): (5.0, 5.0, 1),
    }
    clock.now_ms = T0 + 62_000
    await agg.flush()
    assert sorted((r.symbol, r.count, r.low, r.high) for r in sink.submitted) == [
        ("BTCUSDT", 3, 1.0, 3.0),
        ("ETHUSDT", 1, 5.0, 5.0),
    ]


@pytest.mark.parametrize("form", ["single", "folded", "window_for"])
def test_a_window_made_after_a_restore_refuses_seconds_below_the_floor(form: str) -> None:
    agg, _, _ = make(ManualClock(T0 + 10_000))
    agg.floor_second = S0 + 5  # a restore made everything older durable
    if form == "single":
        agg.fold(TickBatch("ex1", {"BTCUSDT": [(1.0, T0 + 1_000)]}, T0, 1))
    elif form == "folded":
        agg.fold(folded("ex1", T0, ("BTCUSDT", S0 + 1, [1.0, 1.0, 1.0, 1.0, T0 + 1_000.0, 1.0])))
    else:
        agg.window_for("ex1", "BTCUSDT").add([(1.0, T0 + 1_000)], T0)
    w = agg.window("ex1", "BTCUSDT")
    assert w is not None
    assert w.late == 1
    assert not w.dirty_seconds


async def test_windows_sharing_a_pending_minute_are_all_swept_when_it_closes() -> None:
    clock = ManualClock(T0 + 1_000)
    agg, _, sink = make(clock)
    await agg.flush()  # a full sweep now; the next full one 10 s later
    agg.fold(TickBatch("ex1", {"A": [(1.0, T0 + 500)]}, T0, 1))
    await agg.flush()
    agg.fold(TickBatch("ex2", {"A": [(2.0, T0 + 600)]}, T0, 1))
    agg.fold(TickBatch("ex1", {"B": [(3.0, T0 + 700)]}, T0, 1))
    await agg.flush()
    clock.now_ms = T0 + 52_000
    await agg.flush()  # full sweep: nothing closed yet; the next full one at T0+62 s
    clock.now_ms = T0 + 61_999  # a partial sweep (before the next full one) closes minute T0
    await agg.flush()
    assert sorted((r.exchange, r.symbol) for r in sink.submitted) == []  # grace: T0+62 s
    clock.now_ms = T0 + 62_000
    await agg.flush()
    assert sorted((r.exchange, r.symbol, r.count) for r in sink.submitted) == [
        ("ex1", "A", 1),
        ("ex1", "B", 1),
        ("ex2", "A", 1),
    ]


async def test_a_partial_sweep_closes_a_minute_exactly_at_its_end_plus_grace() -> None:
    clock = ManualClock(T0 + 52_000)
    agg, _, sink = make(clock)
    await agg.flush()  # full sweep; next full sweep at T0+62 001
    clock.now_ms = T0 + 52_001
    agg._next_full_sweep = T0 + 62_001
    agg.fold(TickBatch("ex1", {"A": [(1.0, T0 + 500)]}, T0, 1))
    await agg.flush()
    clock.now_ms = T0 + 61_999
    await agg.flush()
    assert sink.submitted == []
    clock.now_ms = T0 + 62_000  # 60 s + 2 s grace after the minute start: closed now
    await agg.flush()
    assert [(r.symbol, r.minute_ms) for r in sink.submitted] == [("A", T0)]


async def test_a_flush_without_a_sweep_closes_no_minute() -> None:
    clock = ManualClock(T0 + 1_000)
    agg, cache, sink = make(clock)
    agg.fold(TickBatch("ex1", {"A": [(1.0, T0 + 500)]}, T0, 1))
    await agg.flush(sweep=False)
    clock.now_ms = T0 + 70_000
    await agg.flush(sweep=False)
    assert sink.submitted == []
    assert cache.writes == 1
    await agg.flush()
    assert [r.symbol for r in sink.submitted] == ["A"]


async def test_a_final_flush_writes_the_cache_even_before_the_retry_time() -> None:
    clock = ManualClock(T0 + 1_000)
    agg, cache, _ = make(clock)
    cache.down = True
    agg.fold(TickBatch("ex1", {"A": [(1.0, T0 + 500)]}, T0, 1))
    await agg.flush()
    assert not agg.cache_up
    cache.down = False
    await agg.flush()  # before the retry time: skipped
    assert cache.writes == 0
    await agg.flush(final=True)  # the last chance: tried regardless
    assert cache.writes == 1
    assert cache.latest[("ex1", "A")].price == 1.0


async def test_a_mark_alone_reaches_the_cache_and_a_refill_carries_the_marks() -> None:
    clock = ManualClock(T0 + 1_000)
    agg, cache, _ = make(clock)
    b = TickBatch("fix", {}, T0, 0)
    b.mark = 42
    agg.fold(b)
    await agg.flush()
    assert cache.writes == 1
    assert cache.marks == {"fix": (42, T0 + 1_000)}
    cache.marks.clear()
    cache.down = True
    agg.fold(TickBatch("fix", {"A": [(1.0, T0 + 900)]}, T0, 1))
    await agg.flush()
    cache.down = False
    clock.now_ms = T0 + 10_000
    await agg.flush()  # back: everything held is written again, marks included
    assert cache.marks == {"fix": (42, T0 + 1_000)}


async def test_no_time_passed_credits_no_coverage_at_all() -> None:
    clock = ManualClock(T0 + 1_000)
    agg, _, _ = make(clock, healthy=("ex1",))
    await agg.flush()  # no time since the aggregator was made
    assert agg.coverage == {}


async def test_coverage_is_kept_until_a_whole_second_past_the_retention() -> None:
    retention_ms = (PipelineSettings().window_retention_s + 120) * 1000
    clock = ManualClock(T0)
    agg, _, _ = make(clock)
    agg.coverage["ex1"] = {T0: 60_000}
    agg._covered_until = T0 + retention_ms + 500  # the floor is whole seconds: still T0
    agg._next_full_sweep = 0
    clock.now_ms = agg._covered_until
    await agg.flush()
    assert agg.coverage["ex1"] == {T0: 60_000}
    clock.now_ms = T0 + retention_ms + 1_000
    agg._next_full_sweep = 0
    await agg.flush()
    assert agg.coverage["ex1"] == {}


async def test_a_fresh_aggregator_reports_no_delay_no_error_and_the_bare_loss_bound() -> None:
    agg, _, _ = make(ManualClock(T0))
    assert (agg.queue_delay_peak_ms, agg.flush_duration_ms, agg.cache_error) == (0, 0, "")
    assert agg.loss_bound_ms() == PipelineSettings().flush_interval_ms
    await agg.flush()  # nothing folded: the peak published is still zero
    assert agg.queue_delay_peak_ms == 0


async def test_the_log_names_a_failed_batch_and_a_refilled_cache(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.aggregator")
    clock = ManualClock(T0 + 1_000)
    agg, cache, _ = make(clock)
    agg._fanin.put_nowait(TickBatch("ex7", {"A": None}, T0, 3))  # type: ignore[dict-item]
    agg.drain()
    assert "fold_failed exchange=ex7 ticks=3" in caplog.text
    agg.fold(TickBatch("ex1", {"A": [(1.0, T0 + 500)]}, T0, 1))
    await agg.flush()  # a write got through: what the cache loses now, it lacks
    cache.down = True
    agg.fold(TickBatch("ex1", {"A": [(1.0, T0 + 1500)]}, T0, 1))
    await agg.flush()
    cache.down = False
    cache.lost = True  # back, emptied: the write that gets through says so
    clock.now_ms = T0 + 10_000
    await agg.flush()
    await agg.flush()  # the refill
    assert "cache_down kind=fake error=fake cache is down" in caplog.text
    assert "cache_lost_data kind=fake action=refill" in caplog.text
    assert "cache_refilled kind=fake seconds=2" in caplog.text


async def test_within_one_slice_a_backlog_is_folded_without_yielding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A clock that never moves: the slice never ends, so the other task cannot run between
    # two batches (a slice end that came early, or at equality, would let it).
    monkeypatch.setattr(aggregator_module, "FOLD_SLICE_S", 0.0)
    monkeypatch.setattr(loop_slices, "time", SimpleNamespace(perf_counter=lambda: 5.0))
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    agg = Aggregator(
        fanin, FakeCache(), RecordingSink(FakeStore()), PipelineSettings(), ManualClock(T0)
    )
    for i in range(20):
        fanin.put_nowait(TickBatch("ex", {"A": [(1.0, T0 + i)]}, T0, 1))
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
    assert agg.ticks_folded == 20
    assert {n for n in seen if 0 < n < 20} == set()
