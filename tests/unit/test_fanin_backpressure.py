"""README: queues are bounded; when the aggregator falls behind, the fan-in queue fills, workers
block, the source queue fills, the reader stops reading and TCP pushes back on the exchange.
Nothing is dropped: once the consumer resumes, every tick the exchange sent arrives."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import orjson

from marketflow.adapters.feeds.tcp_json import build_json_source
from marketflow.app.ingest import RunningSource
from marketflow.domain.ticks import TickBatch
from marketflow.settings import ExchangeSettings, PipelineSettings

PAIRS = ("BTCUSDT", "ETHUSDT")
LINES = 400_000  # ~25 MB: far more than the queues and the socket buffers can hold
T0 = 1_795_000_000_000


async def settle(rounds: int = 200) -> None:
    """Let every ready task run until it blocks (loop turns, not wall time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_full_fanin_stops_the_reader_and_no_tick_is_dropped() -> None:
    block = b"".join(
        orjson.dumps({"symbol": PAIRS[i % 2], "price": 100.0 + i % 7, "timestamp": T0 + i}) + b"\n"
        for i in range(1000)
    )
    sent = 0
    done = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def exchange(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        writers.append(w)
        for _ in range(LINES // 1000):
            w.write(block)
            await w.drain()  # blocks while the daemon does not read
            sent += len(block)
        done.set()

    server = await asyncio.start_server(exchange, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipeline = PipelineSettings(read_chunk_bytes=65536, stale_after_s=300.0)
    source = build_json_source(
        ExchangeSettings(name="exchange1", port=port), PAIRS, pipeline, lambda: T0
    )
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue(2)
    running = RunningSource(source, fanin, 2, 4)  # type: ignore[arg-type]
    status = source.status
    try:
        # Nobody consumes: fan-in full, the workers blocked, the source queue full, and the
        # exchange's writes no longer drain (its socket buffer is full).
        await until(
            lambda: (
                fanin.full()
                and running.queue.full()
                and bool(writers)
                and writers[0].transport.get_write_buffer_size() > 0
            )
        )
        await settle()  # whatever was ready runs until it blocks (a last chunk may be read)
        read = status.bytes_in
        await settle()
        assert status.bytes_in == read  # the reader is parked: it reads nothing more
        assert not done.is_set()
        assert read < len(block) * LINES // 1000 // 4  # nowhere near everything buffered

        ticks = 0
        while ticks < LINES:  # the aggregator resumes: every tick arrives, none dropped
            ticks += (await asyncio.wait_for(fanin.get(), 30)).count
        await asyncio.wait_for(done.wait(), 30)
        assert ticks == LINES
        assert status.rejects.total() == 0
        assert sent == len(block) * LINES // 1000
    finally:
        await running.stop()
        server.close()
        for w in writers:
            w.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
