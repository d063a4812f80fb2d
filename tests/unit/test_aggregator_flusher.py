"""The flusher's turn with literal expectations: it flushes once the queue is drained or the
ceiling has passed, sweeps minutes once per ceiling, and coalesces by the wait it computes.
The sleep is injected, so waits are recorded, not spent."""

from __future__ import annotations

import asyncio

import pytest

from marketflow.app.aggregator import BEHIND_FACTOR, Aggregator
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000  # a minute start


class Recorder:
    """The injected sleep: records each wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def make(
    clock: ManualClock, **pipeline: int
) -> tuple[Aggregator, FakeCache, RecordingSink, Recorder]:
    cache = FakeCache()
    sink = RecordingSink(FakeStore())
    sleep = Recorder()
    agg = Aggregator(asyncio.Queue(), cache, sink, PipelineSettings(**pipeline), clock, sleep=sleep)
    return agg, cache, sink, sleep


def tick(exchange: str, price: float, ts: int) -> TickBatch:
    return TickBatch(exchange, {"BTCUSDT": [(price, ts)]}, ts, 1)


@pytest.mark.parametrize(
    ("min_ms", "ceiling_ms", "build_s", "expected"),
    [
        (2, 20, 0.0005, 0.002),  # a cheap flush: the minimum gap
        (2, 20, 0.004, 0.008),  # twice the CPU the flush took
        (2, 20, 0.05, 0.02),  # never past the ceiling
        (0, 20, 0.0, 0.0),  # no minimum and a free flush: no wait at all
        (7, 20, 0.0035, 0.007),  # a tie between the minimum and twice the build
    ],
)
def test_the_coalescing_wait_is_the_minimum_or_twice_the_build_capped_by_the_ceiling(
    min_ms: int, ceiling_ms: int, build_s: float, expected: float
) -> None:
    agg, _, _, _ = make(ManualClock(T0), flush_min_interval_ms=min_ms, flush_interval_ms=ceiling_ms)
    agg.flush_build_s = build_s
    assert agg.coalesce_wait_s() == pytest.approx(expected)


def test_behind_its_feeds_the_flusher_waits_longer_between_flushes_up_to_the_ceiling() -> None:
    """Batches waited longer than the ceiling: BEHIND_FACTOR times the build, not twice."""
    agg, _, _, _ = make(ManualClock(T0), flush_min_interval_ms=1, flush_interval_ms=100)
    agg.flush_build_s = 0.005
    assert agg.coalesce_wait_s() == pytest.approx(0.010)  # keeping up
    agg.queue_delay_peak_ms = 101
    assert agg.coalesce_wait_s() == pytest.approx(0.005 * BEHIND_FACTOR)
    agg.flush_build_s = 0.05
    assert agg.coalesce_wait_s() == pytest.approx(0.1)  # the ceiling still holds
    agg.queue_delay_peak_ms = 100
    assert agg.coalesce_wait_s() == pytest.approx(0.1)  # 2 x 50 ms: capped too


async def test_a_turn_flushes_at_once_when_the_queue_was_drained_then_waits_the_gap() -> None:
    clock = ManualClock(T0 + 500)
    agg, cache, _, sleep = make(clock, flush_min_interval_ms=3, flush_interval_ms=10_000)
    agg.fold(tick("ex", 1.0, T0))
    agg._folded.set()  # what the consumer does once the fan-in queue is empty
    async with asyncio.timeout(5):  # half the 10 s ceiling: only the idle signal can do it
        await agg.flush_step()
    assert cache.writes == 1
    assert cache.latest[("ex", "BTCUSDT")].price == 1.0
    assert not agg._folded.is_set()  # the signal is consumed by the turn it woke
    assert len(sleep.waits) == 1
    assert sleep.waits[0] == pytest.approx(max(0.003, 2 * agg.flush_build_s))


async def test_a_turn_without_the_idle_signal_flushes_at_the_ceiling() -> None:
    clock = ManualClock(T0 + 500)
    agg, cache, _, sleep = make(clock, flush_min_interval_ms=0, flush_interval_ms=5)
    agg.fold(tick("ex", 2.0, T0 + 500))  # received now: not behind
    async with asyncio.timeout(5):
        await agg.flush_step()  # nothing sets the signal: the 5 ms ceiling ends the wait
    assert cache.writes == 1
    assert cache.latest[("ex", "BTCUSDT")].price == 2.0
    assert sleep.waits == [pytest.approx(2 * agg.flush_build_s)]  # no minimum: twice the build


async def test_minutes_are_swept_once_per_ceiling_not_at_every_turn() -> None:
    clock = ManualClock(T0 + 500)
    agg, _, sink, _ = make(clock, flush_interval_ms=1000, minute_grace_ms=0)
    agg.fold(tick("ex", 1.0, T0 + 100))
    agg.fold(tick("ex", 3.0, T0 + 200))
    swept: list[bool] = []
    flush = agg.flush

    async def spy(*, final: bool = False, sweep: bool = True) -> None:
        swept.append(sweep)
        await flush(final=final, sweep=sweep)

    agg.flush = spy  # type: ignore[method-assign]
    for now in (T0 + 500, T0 + 900, T0 + 1499, T0 + 1500, T0 + 2000):
        clock.now_ms = now
        agg._folded.set()
        await agg.flush_step()
    # the first turn sweeps and sets the next sweep one ceiling (1000 ms) later
    assert swept == [True, False, False, True, False]
    assert sink.submitted == []  # the minute is still open
    clock.now_ms = T0 + 60_000 + 400  # closed, but the last sweep was at T0+1500 + 1000 ms
    for _ in range(2):
        agg._folded.set()
        await agg.flush_step()
    assert swept[-2:] == [True, False]
    assert [(r.minute_ms, r.count, r.low, r.high) for r in sink.submitted] == [(T0, 2, 1.0, 3.0)]


async def test_the_flusher_loops_turns_until_cancelled() -> None:
    clock = ManualClock(T0 + 500)
    agg, cache, _, _ = make(clock, flush_min_interval_ms=0, flush_interval_ms=5)
    turns = 0
    step = agg.flush_step

    async def counting() -> None:
        nonlocal turns
        turns += 1
        agg.fold(tick("ex", float(turns), T0 + turns))
        await step()

    agg.flush_step = counting  # type: ignore[method-assign]
    task = asyncio.create_task(agg.run_flusher())
    async with asyncio.timeout(5):
        while cache.writes < 3:  # noqa: ASYNC110 - a poll of a fake, by design
            await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert turns >= 3
    assert cache.writes >= 3
