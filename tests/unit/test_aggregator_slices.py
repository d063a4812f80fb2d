"""A flush builds what it writes in slices of the loop (at 500 pairs x 10 exchanges one
step took 40-60 ms): the loop runs in between, nothing is folded meanwhile (the write is one
state with the marks it carries), and a stop in the middle loses nothing."""

from __future__ import annotations

import asyncio

import pytest

from marketflow.app import aggregator as aggregator_module
from marketflow.app.aggregator import Aggregator
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000  # a minute start
PAIRS = [f"P{i}USDT" for i in range(200)]


def batch(ts: int, mark: int, price: float = 1.0) -> TickBatch:
    b = TickBatch("ex1", {s: [(price, ts)] for s in PAIRS}, ts, len(PAIRS))
    b.mark = mark
    return b


@pytest.fixture(autouse=True)
def every_check_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregator_module, "FLUSH_SLICE_S", 0.0)


def make() -> tuple[Aggregator, asyncio.Queue[TickBatch], FakeCache]:
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    cache = FakeCache()
    agg = Aggregator(fanin, cache, RecordingSink(FakeStore()), PipelineSettings(), ManualClock(T0))
    return agg, fanin, cache


async def test_the_loop_runs_while_a_flush_builds_and_nothing_is_folded_meanwhile() -> None:
    agg, fanin, cache = make()
    agg.fold(batch(T0 + 100, mark=1))
    consumer = asyncio.create_task(agg.consume())
    flushing = asyncio.create_task(agg.flush(sweep=False))
    turns = 0
    while not flushing.done():
        if turns == 1:  # mid-build: a batch arrives, and the consumer is free to run
            fanin.put_nowait(batch(T0 + 200, mark=2, price=2.0))
        turns += 1
        await asyncio.sleep(0)
    await flushing
    assert turns > 3  # the build yielded to the loop several times
    # The write is the state the flush began with: one tick per pair, position 1.
    assert sorted(cache.seconds) == [("ex1", s, T0 // 1000) for s in sorted(PAIRS)]
    assert {b.count for b in cache.seconds.values()} == {1}
    assert {k: pos for k, (pos, _) in cache.marks.items()} == {"ex1": 1}
    assert {lp.price for lp in cache.latest.values()} == {1.0}
    await asyncio.wait_for(fanin.join(), 5)  # folded once the flush was done
    await agg.flush(sweep=False)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    assert {b.count for b in cache.seconds.values()} == {2}
    assert {k: pos for k, (pos, _) in cache.marks.items()} == {"ex1": 2}
    assert {lp.price for lp in cache.latest.values()} == {2.0}


async def test_a_flush_cancelled_mid_build_leaves_what_it_took_to_the_final_flush() -> None:
    agg, _, cache = make()
    agg.fold(batch(T0 + 100, mark=7))
    flushing = asyncio.create_task(agg.flush(sweep=False))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the build is under way, paused
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert cache.writes == 0
    await agg.flush(final=True)  # stopping: everything taken is written now
    assert sorted(cache.seconds) == [("ex1", s, T0 // 1000) for s in sorted(PAIRS)]
    assert {k: pos for k, (pos, _) in cache.marks.items()} == {"ex1": 7}
    assert len(cache.latest) == len(PAIRS)


async def test_a_flush_cancelled_during_its_write_owes_it_to_the_next() -> None:
    agg, _, cache = make()
    agg.fold(batch(T0 + 100, mark=3))
    gate = asyncio.Event()
    write = cache.write

    async def slow_write(*args: object, **kwargs: object) -> bool:
        await gate.wait()
        return await write(*args, **kwargs)  # type: ignore[arg-type]

    cache.write = slow_write  # type: ignore[method-assign]
    flushing = asyncio.create_task(agg.flush(sweep=False))
    for _ in range(50):
        await asyncio.sleep(0)
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    cache.write = write  # type: ignore[method-assign]
    await agg.flush(final=True)
    assert sorted(cache.seconds) == [("ex1", s, T0 // 1000) for s in sorted(PAIRS)]
    assert {k: pos for k, (pos, _) in cache.marks.items()} == {"ex1": 3}
