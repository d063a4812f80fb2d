"""Kafka partitions moving between aggregate nodes (app/partitions.py and the aggregator's
side of it): what is restored on taking partitions over, what is flushed and forgotten on
handing them back, whose position a batch's mark is, and the order of the two writes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Collection, Mapping, Sequence

import pytest

from marketflow.app.aggregator import Aggregator
from marketflow.app.minute_writer import MinuteWriter
from marketflow.app.partitions import PartitionOwner
from marketflow.domain.aggregates import LatestPrice, Mark, SecondBucket, SecondRow
from marketflow.domain.errors import ConfigError
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings, load_settings
from tests.unit.fakes import FakeCache, FakeSpill, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000  # a minute start
P0, P1 = "kafka:t:0", "kafka:t:1"


def _batch(symbol: str, ts: int, source: str, offset: int, price: float = 1.0) -> TickBatch:
    return TickBatch("ex1", {symbol: [(price, ts)]}, ts, 1, mark=offset, mark_source=source)


async def _node(
    clock: ManualClock, cache: FakeCache, store: FakeStore
) -> tuple[Aggregator, PartitionOwner, MinuteWriter]:
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    writer = MinuteWriter(store, FakeSpill(), 1000, clock)
    await writer.start()
    agg = Aggregator(fanin, cache, writer, PipelineSettings(), clock, rng=random.Random(1))
    return agg, PartitionOwner(agg, store, writer, fanin), writer


def test_a_batch_records_the_position_of_its_mark_source_not_its_exchange() -> None:
    agg = Aggregator(
        asyncio.Queue(), FakeCache(), RecordingSink(FakeStore()), PipelineSettings(),
        ManualClock(T0),
    )  # fmt: skip
    agg.fold(_batch("BTCUSDT", T0, P0, 41))
    agg.fold(TickBatch("ex1", {}, T0, 0, mark=42, mark_source=P0))  # only poison: mark moves
    assert agg.position(P0) == 42
    assert agg.position("ex1") is None
    assert agg.window("kafka", "BTCUSDT") is None
    assert "kafka" not in agg.windows  # an empty batch makes no window table


async def test_taking_partitions_restores_only_their_symbols_and_marks() -> None:
    clock = ManualClock(T0 + 120_000)
    cache, store = FakeCache(), FakeStore()
    s = T0 // 1000
    await cache.write(
        [LatestPrice("ex1", "BTCUSDT", 2.0, T0 + 1500, T0),
         LatestPrice("ex1", "ETHUSDT", 3.0, T0, T0)],
        [SecondBucket("ex1", "BTCUSDT", s + 1, 1.0, 2.0, 3.0, 2),
         SecondBucket("ex1", "ETHUSDT", s, 3.0, 3.0, 3.0, 1)],
        {P0: (7, T0), P1: (9, T0)},
    )  # fmt: skip
    agg, owner, writer = await _node(clock, cache, store)
    await owner.take([P0], lambda sym: sym == "BTCUSDT")
    w = agg.window("ex1", "BTCUSDT")
    assert w is not None
    assert w.everything() is not None
    assert w.everything().count == 2  # type: ignore[union-attr]
    assert agg.window("ex1", "ETHUSDT") is None  # another node's symbol
    assert owner.position(P0) == 7
    assert owner.position(P1) is None  # another node's partition
    assert owner.held == {P0}
    await writer.aclose()


async def test_handing_partitions_back_flushes_then_forgets_them() -> None:
    clock = ManualClock(T0 + 10_000)
    cache, store = FakeCache(), FakeStore()
    agg, owner, writer = await _node(clock, cache, store)
    await owner.take([P0, P1], lambda sym: True)
    agg.fold(_batch("BTCUSDT", T0 + 1000, P0, 5))
    agg.fold(_batch("ETHUSDT", T0 + 1000, P1, 8))
    clock.now_ms = T0 + 70_000  # minute T0 closed (grace 2 s)
    positions = await owner.release([P0], lambda sym: sym == "BTCUSDT")
    assert positions == {P0: 5}
    assert cache.marks[P0][0] == 5  # flushed with its seconds
    assert ("ex1", "BTCUSDT", (T0 + 1000) // 1000) in cache.seconds
    assert store.rows[("ex1", "BTCUSDT", T0)].count == 1  # the closed minute, written
    assert store.marks[P0][0] == 5
    assert agg.window("ex1", "BTCUSDT") is None
    assert agg.window("ex1", "ETHUSDT") is not None
    assert owner.held == {P1}
    # Nothing of the partition handed back is written by this node afterwards.
    cache.wipe()  # even a refill (Redis came back empty) writes nothing of it
    agg.fold(_batch("ETHUSDT", T0 + 2000, P1, 9))
    await agg.flush()
    await agg.flush()  # the refill
    assert P0 not in cache.marks
    assert cache.marks[P1][0] == 9
    assert all(sym != "BTCUSDT" for _, sym, _ in cache.seconds)
    await writer.aclose()


class _SlowCache(FakeCache):
    """A cache whose writes wait for ``go``."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def write(
        self,
        latest: Sequence[LatestPrice],
        seconds: Collection[SecondRow],
        marks: Mapping[str, Mark] | None = None,
        *,
        whole: bool = False,
    ) -> bool:
        self.waiting.set()
        await self.go.wait()
        return await super().write(latest, seconds, marks, whole=whole)


async def test_rows_and_marks_reach_the_store_only_after_the_cache_holds_the_seconds() -> None:
    clock = ManualClock(T0 + 70_000)
    cache, store = _SlowCache(), FakeStore()
    sink = RecordingSink(store)
    agg = Aggregator(asyncio.Queue(), cache, sink, PipelineSettings(), clock)
    agg.fold(_batch("BTCUSDT", T0 + 1000, P0, 5))
    flush = asyncio.create_task(agg.flush())
    await cache.waiting.wait()
    assert sink.submitted == []  # a crash now: the store's mark is not ahead of the cache's
    assert P0 not in store.marks
    cache.go.set()
    await flush
    assert [r.count for r in sink.submitted] == [1]
    assert store.marks[P0][0] == 5


async def test_rows_still_reach_the_store_while_the_cache_is_down() -> None:
    clock = ManualClock(T0 + 70_000)
    cache, store = FakeCache(), FakeStore()
    cache.down = True
    sink = RecordingSink(store)
    agg = Aggregator(asyncio.Queue(), cache, sink, PipelineSettings(), clock)
    agg.fold(_batch("BTCUSDT", T0 + 1000, P0, 5))
    await agg.flush()
    assert [r.count for r in sink.submitted] == [1]


def test_the_aggregate_role_refuses_embedded_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETFLOW_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("MARKETFLOW_POSTGRES__DSN", "postgresql://x@127.0.0.1/x")
    with pytest.raises(ConfigError, match=r"postgres\.dsn and redis\.url"):
        load_settings(None, node={"role": "aggregate"})
    monkeypatch.setenv("MARKETFLOW_REDIS__URL", "redis://127.0.0.1:6379/0")
    assert load_settings(None, node={"role": "aggregate"}).node.role == "aggregate"
