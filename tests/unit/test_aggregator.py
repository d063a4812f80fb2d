import asyncio

from marketflow.app.aggregator import Aggregator
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000


def make(clock: ManualClock) -> tuple[Aggregator, FakeCache, RecordingSink]:
    cache = FakeCache()
    sink = RecordingSink(FakeStore())
    agg = Aggregator(asyncio.Queue(), cache, sink, PipelineSettings(), clock)
    return agg, cache, sink


def batch(exchange: str, *ticks: tuple[str, float, int]) -> TickBatch:
    by: dict[str, list[tuple[float, int]]] = {}
    for sym, p, ts in ticks:
        by.setdefault(sym, []).append((p, ts))
    return TickBatch(exchange, by, ticks[-1][2], len(ticks))


async def test_flush_writes_changed_latest_and_seconds_to_cache_once() -> None:
    clock = ManualClock(T0 + 500)
    agg, cache, _ = make(clock)
    agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0), ("BTCUSDT", 2.0, T0 + 100)))
    agg.fold(batch("ex2", ("ETHUSDT", 3.0, T0 + 200)))
    await agg.flush()
    assert cache.writes == 1
    assert cache.latest[("ex1", "BTCUSDT")].price == 2.0
    assert cache.seconds[("ex1", "BTCUSDT", T0 // 1000)].count == 2
    await agg.flush()
    assert cache.writes == 1  # nothing changed: no round trip


async def test_closed_minute_goes_to_writer_once_with_avg_min_max_count() -> None:
    clock = ManualClock(T0 + 10_000)
    agg, _, sink = make(clock)
    agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0), ("BTCUSDT", 3.0, T0 + 30_000)))
    await agg.flush()
    assert sink.submitted == []
    clock.now_ms = T0 + 62_500
    await agg.flush()
    await agg.flush()
    assert [
        (r.exchange, r.symbol, r.minute_ms, r.average, r.low, r.high, r.count)
        for r in sink.submitted
    ] == [("ex1", "BTCUSDT", T0, 2.0, 1.0, 3.0, 2)]


async def test_final_flush_writes_partial_minute() -> None:
    clock = ManualClock(T0 + 10_000)
    agg, _, sink = make(clock)
    agg.fold(batch("ex1", ("BTCUSDT", 5.0, T0 + 9_000)))
    await agg.flush(final=True)
    assert [r.count for r in sink.submitted] == [1]


async def test_cache_outage_keeps_ingesting_and_refills_everything_on_return() -> None:
    clock = ManualClock(T0 + 500)
    agg, cache, sink = make(clock)
    cache.down = True
    agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0)))
    await agg.flush()
    assert not agg.cache_up
    agg.fold(batch("ex1", ("BTCUSDT", 2.0, T0 + 1500)))
    clock.now_ms = T0 + 62_500
    await agg.flush()
    assert [r.count for r in sink.submitted] == [2]  # rows still reach storage
    cache.down = False
    clock.now_ms = T0 + 80_000
    await agg.flush()
    assert agg.cache_up
    assert set(cache.seconds) == {
        ("ex1", "BTCUSDT", T0 // 1000),
        ("ex1", "BTCUSDT", T0 // 1000 + 1),
    }
    assert cache.latest[("ex1", "BTCUSDT")].price == 2.0


async def test_resume_restores_window_so_a_restarted_minute_is_rewritten_whole() -> None:
    clock = ManualClock(T0 + 30_000)
    agg, cache, sink = make(clock)
    agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0 + 1_000), ("BTCUSDT", 3.0, T0 + 2_000)))
    await agg.flush(final=True)  # shutdown mid-minute
    # a new process with the same cache and store
    agg2 = Aggregator(asyncio.Queue(), cache, sink, PipelineSettings(), clock)
    await agg2.resume(sink.store)
    agg2.fold(batch("ex1", ("BTCUSDT", 5.0, T0 + 40_000)))
    clock.now_ms = T0 + 63_000
    await agg2.flush()
    row = sink.store.rows[("ex1", "BTCUSDT", T0)]
    assert (row.count, row.low, row.high, row.average) == (3, 1.0, 5.0, 3.0)


async def test_resume_without_cache_uses_persisted_minute_as_base() -> None:
    clock = ManualClock(T0 + 30_000)
    agg, _, sink = make(clock)
    agg.fold(batch("ex1", ("BTCUSDT", 1.0, T0 + 1_000), ("BTCUSDT", 3.0, T0 + 2_000)))
    await agg.flush(final=True)
    agg2 = Aggregator(asyncio.Queue(), FakeCache(), sink, PipelineSettings(), clock)
    await agg2.resume(sink.store)
    agg2.fold(batch("ex1", ("BTCUSDT", 5.0, T0 + 40_000)))
    clock.now_ms = T0 + 63_000
    await agg2.flush()
    assert sink.store.rows[("ex1", "BTCUSDT", T0)].count == 3


async def test_consume_drains_queued_batches() -> None:
    clock = ManualClock(T0)
    agg, _, _ = make(clock)
    q: asyncio.Queue[TickBatch] = asyncio.Queue()
    agg._fanin = q
    for i in range(10):
        q.put_nowait(batch("ex1", ("BTCUSDT", 1.0 + i, T0 + i)))
    task = asyncio.create_task(agg.consume())
    await q.join()
    task.cancel()
    assert agg.ticks_folded == 10
