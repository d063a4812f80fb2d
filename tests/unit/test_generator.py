"""The test-mode generator: live-format bytes through the same parser, on an injected clock."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest

from marketflow.adapters.feeds.generator import GeneratorProducer, build_generator_source
from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.app.ingest import RunningSource
from marketflow.domain.feeds import FeedStatus
from marketflow.domain.ticks import TickBatch
from marketflow.settings import DEFAULT_PAIRS
from marketflow.settings import TestModeSettings as GeneratorSettings  # not a test class
from marketflow.simulator.json_exchange import walk_for_port
from tests.harness.walk_oracle import PAIRS, line, walk_rounds


class FakeTime:
    """A clock and a sleep that only move when the producer sleeps."""

    def __init__(self) -> None:
        self.now_s = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now_s

    def clock_ms(self) -> int:
        return 1_795_000_000_000 + int(self.now_s * 1000)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now_s += delay
        await asyncio.sleep(0)


async def run_for(
    producer: GeneratorProducer, chunks: int, maxsize: int = 0
) -> tuple[list[tuple[bytes, int]], FeedStatus]:
    status = FeedStatus(name="test-exchange1", protocol="generator")
    queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue(maxsize)
    task = asyncio.create_task(producer.run(queue, status))
    items = [await asyncio.wait_for(queue.get(), 5) for _ in range(chunks)]
    assert status.connected
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not status.connected
    return items, status


async def test_one_chunk_per_interval_with_one_line_per_pair_stamped_by_the_clock() -> None:
    t = FakeTime()
    walk = walk_for_port(40101, seed=9)
    producer = GeneratorProducer(walk, 100, t.clock_ms, sleep=t.sleep, monotonic=t.monotonic)

    items, status = await run_for(producer, 3)

    assert t.sleeps[:3] == pytest.approx([0.1, 0.1, 0.1])
    for chunk, received_ms in items:
        rows = [orjson.loads(x) for x in chunk.splitlines()]
        assert [r["symbol"] for r in rows] == list(DEFAULT_PAIRS)
        assert {r["timestamp"] for r in rows} == {received_ms}
    assert [ms for _, ms in items] == [items[0][1] + 100 * i for i in range(3)]
    assert status.chunks >= 3
    assert status.address == "generator"


async def test_bytes_are_exactly_the_simulator_format_for_the_same_seed() -> None:
    t = FakeTime()
    producer = GeneratorProducer(
        walk_for_port(40101, seed=3), 100, t.clock_ms, sleep=t.sleep, monotonic=t.monotonic
    )

    items, _ = await run_for(producer, 3)

    rounds = walk_rounds(40101, seed=3, rounds=3)  # the walk re-implemented in the test
    expected = [
        b"".join(line(p, price, ms) for p, price in zip(PAIRS, prices, strict=True))
        for prices, (_, ms) in zip(rounds, items, strict=True)
    ]
    assert [c for c, _ in items] == expected
    assert items[0][0].startswith(b'{"symbol":"BTCUSDT","price":')  # the wire format, literally


async def test_factory_source_parses_through_json_lines_parser_with_status_rejects() -> None:
    t = FakeTime()
    settings = GeneratorSettings(interval_ms=10, seed=42)

    source = build_generator_source("test-exchange2", DEFAULT_PAIRS, settings, 1, t.clock_ms)

    assert isinstance(source.parser, JsonLinesParser)
    assert source.parser.rejects is source.status.rejects
    assert source.parser.exchange == "test-exchange2"
    assert source.status.protocol == "generator"
    producer = source.producer
    assert isinstance(producer, GeneratorProducer)
    assert producer.walk.prices()[0] == 100029.0  # index 1: exchange2's starting prices
    items, _ = await run_for(producer, 4)  # real 10 ms intervals, fake timestamps
    batches = [source.parser.parse(c, ms) for c, ms in items]
    assert [b.count for b in batches] == [5, 5, 5, 5]
    assert source.status.rejects.total() == 0


def test_sources_differ_but_a_seed_repeats() -> None:
    s = GeneratorSettings(seed=1)
    a0 = build_generator_source("a", DEFAULT_PAIRS, s, 0, int).producer
    b0 = build_generator_source("b", DEFAULT_PAIRS, s, 0, int).producer
    a1 = build_generator_source("c", DEFAULT_PAIRS, s, 1, int).producer
    assert isinstance(a0, GeneratorProducer)
    assert isinstance(b0, GeneratorProducer)
    assert isinstance(a1, GeneratorProducer)

    first, second = walk_rounds(40101, seed=1, rounds=2)
    assert a0.walk.step() == b0.walk.step() == first  # exchange 0: 40101's walk, seed 1
    assert a0.walk.step() == second
    assert a1.walk.step() == walk_rounds(40102, seed=2, rounds=1)[0]  # 40102, seed + index


async def test_a_blocked_queue_skips_missed_intervals_instead_of_bursting() -> None:
    t = FakeTime()
    producer = GeneratorProducer(
        walk_for_port(40101, seed=1), 100, t.clock_ms, sleep=t.sleep, monotonic=t.monotonic
    )
    status = FeedStatus(name="test-exchange1", protocol="generator")
    queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue(1)
    task = asyncio.create_task(producer.run(queue, status))
    try:
        await asyncio.wait_for(queue.get(), 5)
        for _ in range(10):  # the producer refills the queue, renders one more, waits on put
            await asyncio.sleep(0)
        assert queue.full()
        sleeps_before = len(t.sleeps)
        t.now_s += 5.0  # the consumer is away for 50 intervals
        items = [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stamps = [ms for _, ms in items]
    assert stamps[1] - stamps[0] == 100  # rendered before the pause
    assert stamps[2] - stamps[1] >= 5000  # the missed intervals were skipped ...
    assert all(s > 0 for s in t.sleeps[sleeps_before:])  # ... with no zero-delay burst


async def test_generator_runs_in_the_real_worker_pool() -> None:
    settings = GeneratorSettings(interval_ms=1, seed=5)
    source = build_generator_source(
        "test-exchange1", DEFAULT_PAIRS, settings, 0, FakeTime().clock_ms
    )
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    running = RunningSource(source, fanin, 5, 8)  # type: ignore[arg-type]
    batches = [await asyncio.wait_for(fanin.get(), 5) for _ in range(10)]
    await running.stop()

    assert all(b.count == 5 and b.exchange == "test-exchange1" for b in batches)
    assert source.status.ticks >= 50
    assert not source.status.connected


def test_zero_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_ms"):
        GeneratorProducer(walk_for_port(40101), 0, int)
