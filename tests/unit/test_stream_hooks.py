"""What feeds the stream hub: the aggregator once per flush, the minute writer once per
written batch, never per tick and never for rows the store did not take."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from marketflow.app.aggregator import Aggregator
from marketflow.app.minute_writer import MinuteWriter
from marketflow.backoff import Backoff
from marketflow.domain.aggregates import LatestPrice, MinuteRow
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeSpill, FakeStore, ManualClock, RecordingSink
from tests.unit.writer_kit import T0, eventually, row


async def test_aggregator_passes_the_changed_latest_prices_once_per_flush() -> None:
    calls: list[list[LatestPrice]] = []
    clock = ManualClock(T0 + 500)
    sink = RecordingSink(FakeStore())
    agg = Aggregator(asyncio.Queue(), FakeCache(), sink, PipelineSettings(), clock,
                     on_latest=lambda lps: calls.append(list(lps)))  # fmt: skip
    for i in range(100):
        agg.fold(TickBatch("ex1", {"BTCUSDT": [(100.0 + i, T0 + i)]}, T0 + i, 1))
    agg.fold(TickBatch("ex2", {"ETHUSDT": [(5.0, T0)]}, T0, 1))

    await agg.flush()
    await agg.flush()  # nothing changed since: not called

    assert len(calls) == 1
    got = {(lp.exchange, lp.symbol): lp.price for lp in calls[0]}
    assert got == {("ex1", "BTCUSDT"): 199.0, ("ex2", "ETHUSDT"): 5.0}


async def test_minute_writer_passes_each_written_batch_and_not_a_failed_one() -> None:
    batches: list[Sequence[MinuteRow]] = []
    store = FakeStore()
    writer = MinuteWriter(store, FakeSpill(), 1000, ManualClock(T0),
                          retry=Backoff(0.01, 0.05, random.Random(1)),
                          on_written=batches.append)  # fmt: skip
    await writer.start()
    try:
        store.down = True
        writer.submit([row(0), row(1)])
        await eventually(lambda: store.failures >= 1)
        assert batches == []  # not in the store: not streamed
        store.down = False
        await writer.flush()
        writer.submit([row(2)])
        await writer.flush()
    finally:
        await writer.aclose()

    assert [sorted(r.minute_ms for r in b) for b in batches] == [
        [row(0).minute_ms, row(1).minute_ms],
        [row(2).minute_ms],
    ]
