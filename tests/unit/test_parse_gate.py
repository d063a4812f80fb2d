"""The parse gate: a backlog of chunks is parsed a time budget per event-loop pass, across
every source's workers, so the loop polls its sockets (HTTP requests, reads) between passes
instead of after one parse per ready worker; every item is still parsed exactly once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from marketflow.app.ingest import ParseGate, RunningSource
from marketflow.domain.feeds import FeedStatus, Source
from marketflow.domain.ticks import TickBatch

PARSE_S = 0.002  # each fake chunk takes this long to parse (busy: like a real parse)


class PassCounter:
    """Counts event-loop passes: a callback that reschedules itself once per pass."""

    def __init__(self) -> None:
        self.n = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


@dataclass
class BusyParser:
    exchange: str
    passes: PassCounter
    parsed: list[tuple[int, int]] = field(default_factory=list)  # (item, pass number)

    def parse(self, item: int, received_ms: int) -> TickBatch:
        self.parsed.append((item, self.passes.n))
        end = time.perf_counter() + PARSE_S
        while time.perf_counter() < end:
            pass
        return TickBatch(self.exchange, {}, received_ms, 0)


class NoProducer:
    async def run(self, out: object, status: FeedStatus) -> None:
        await asyncio.Event().wait()


async def parse_backlog(budget_s: float, items: int = 12) -> list[BusyParser]:
    """Two sources of five workers each, a backlog of ``items`` per source queued at once."""
    passes = PassCounter()
    gate = ParseGate(budget_s)
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    parsers = [BusyParser(f"ex{i}", passes) for i in range(2)]
    running = [
        RunningSource(
            Source(
                status=FeedStatus(name=p.exchange, protocol="json"),
                producer=NoProducer(),
                parser=p,  # type: ignore[arg-type]
            ),
            fanin,
            5,
            items,
            gate,
        )
        for p in parsers
    ]
    try:
        for r in running:
            for i in range(items):
                r.queue.put_nowait((i, 0))
        for r in running:
            await asyncio.wait_for(r.queue.join(), 10)
    finally:
        for r in running:
            await r.stop()
        passes.stop()
    return parsers


def parses_per_pass(parsers: list[BusyParser]) -> dict[int, int]:
    per: dict[int, int] = {}
    for p in parsers:
        for _, n in p.parsed:
            per[n] = per.get(n, 0) + 1
    return per


async def test_a_backlog_is_parsed_one_budget_per_loop_pass() -> None:
    parsers = await parse_backlog(budget_s=PARSE_S / 2)
    for p in parsers:  # every item exactly once, in queue order
        assert [item for item, _ in p.parsed] == list(range(12))
    per = parses_per_pass(parsers)
    # The budget is spent by the first parse of a pass; a pass may also run the waiter woken
    # for it by the previous pass: never more than two chunks' parse between two polls.
    assert max(per.values()) <= 2
    assert len(per) >= 12  # 24 parses spread over many passes


async def test_a_larger_budget_admits_several_parses_per_pass() -> None:
    per = parses_per_pass(await parse_backlog(budget_s=60.0))
    assert max(per.values()) >= 10  # within the budget every ready worker parses


async def test_no_budget_lets_every_ready_worker_parse_in_one_pass() -> None:
    parsers = await parse_backlog(budget_s=0)
    for p in parsers:
        assert sorted(item for item, _ in p.parsed) == list(range(12))
    assert max(parses_per_pass(parsers).values()) >= 10  # ten workers, all ready at once


async def test_a_waiter_cancelled_in_the_gate_does_not_block_the_next() -> None:
    gate = ParseGate(PARSE_S / 2)
    admitted: list[str] = []

    async def worker(name: str) -> None:
        await gate.admit()
        admitted.append(name)
        end = time.perf_counter() + PARSE_S
        while time.perf_counter() < end:
            pass

    tasks = [asyncio.ensure_future(worker(n)) for n in ("a", "b", "c")]
    await asyncio.sleep(0)  # one pass: a parses, b and c find the budget spent and wait
    assert admitted == ["a"]
    tasks[1].cancel()
    await asyncio.wait_for(tasks[2], 1)
    assert admitted == ["a", "c"]
    assert tasks[1].cancelled()
