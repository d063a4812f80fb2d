"""The live JSON feed reader against a real local TCP server that the test scripts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest

from marketflow.adapters.feeds.tcp_json import (
    AUTO_GROWTH_FACTOR,
    AUTO_GROWTH_PAIRS,
    TcpJsonProducer,
    build_json_source,
)
from marketflow.domain.feeds import FeedStatus
from marketflow.settings import DEFAULT_PAIRS, ExchangeSettings, PipelineSettings
from tests.harness.services import free_port

PIPELINE = PipelineSettings(
    read_chunk_bytes=1024,
    max_line_bytes=256,
    stale_after_s=0.3,
    reconnect_initial_s=0.01,
    reconnect_max_s=0.05,
)
TS = 1795694355187


def line(price: float, symbol: str = "BTCUSDT") -> bytes:
    return b'{"symbol":"%s","price":%r,"timestamp":%d}\n' % (symbol.encode(), price, TS)


def clock() -> int:
    return time.time_ns() // 1_000_000


class FeedServer:
    """A TCP server handing each accepted connection to the test."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _on_client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        await self.accepted.put((r, w))

    async def connection(self, within_s: float = 5.0) -> asyncio.StreamWriter:
        _, w = await asyncio.wait_for(self.accepted.get(), within_s)
        return w

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class Reader:
    """A running producer with its queue and status."""

    def __init__(self, port: int, pipeline: PipelineSettings = PIPELINE, maxsize: int = 0):
        self.producer = TcpJsonProducer("127.0.0.1", port, pipeline, clock)
        self.status = FeedStatus(name="exchange1", protocol="json")
        self.queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue(maxsize)
        self.task = asyncio.create_task(self.producer.run(self.queue, self.status))

    async def chunk(self, within_s: float = 5.0) -> bytes:
        item, received_ms = await asyncio.wait_for(self.queue.get(), within_s)
        assert received_ms > 0
        return item

    async def collect(self, n_bytes: int) -> list[bytes]:
        chunks: list[bytes] = []
        while sum(map(len, chunks)) < n_bytes:
            chunks.append(await self.chunk())
        return chunks

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def server() -> AsyncIterator[FeedServer]:
    s = FeedServer()
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def reader_factory() -> AsyncIterator[Callable[..., Reader]]:
    readers: list[Reader] = []

    def make(port: int, pipeline: PipelineSettings = PIPELINE, maxsize: int = 0) -> Reader:
        r = Reader(port, pipeline, maxsize)
        readers.append(r)
        return r

    yield make
    for r in readers:
        await r.stop()


async def until(cond: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def settle(rounds: int = 200) -> None:
    """Let every ready task run until it blocks (loop turns, not wall time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def send(w: asyncio.StreamWriter, data: bytes, read_by: FeedStatus) -> None:
    """Write ``data`` and wait until the reader has read it: the next write is a separate read."""
    before = read_by.bytes_in
    w.write(data)
    await w.drain()
    await until(lambda: read_by.bytes_in >= before + len(data))


async def test_partial_lines_across_reads_are_put_only_when_complete(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    reader = reader_factory(server.port)
    w = await server.connection()
    one, two, three = line(1.5), line(2.5, "ETHUSDT"), line(3.5, "SOLUSDT")

    await send(w, one[:10], reader.status)
    await send(w, one[10:30], reader.status)
    await send(w, one[30:] + two[:5], reader.status)
    await send(w, two[5:] + three, reader.status)
    chunks = await reader.collect(len(one + two + three))

    assert all(c.endswith(b"\n") for c in chunks)
    assert b"".join(chunks) == one + two + three
    assert chunks[0] == one
    assert reader.status.connected
    assert reader.status.address == f"127.0.0.1:{server.port}"
    assert reader.status.bytes_in == len(one + two + three)
    assert reader.status.chunks == 4


async def test_reads_grow_while_behind_and_shrink_back_once_caught_up(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    pipeline = PIPELINE.model_copy(update={"read_chunk_max_bytes": 8192, "stale_after_s": 30.0})
    reader = reader_factory(server.port, pipeline, maxsize=1)
    w = await server.connection()
    burst = b"".join(line(1.0 + i / 1000) for i in range(3000))  # ~180 KB queued at once
    w.write(burst)
    await w.drain()
    await settle()  # the queue holds one chunk: the rest waits in the socket, read behind
    chunks = await reader.collect(len(burst))
    assert b"".join(chunks) == burst  # every line whole, in order
    assert max(map(len, chunks)) > 4096  # reads grew past read_chunk_bytes (1024) ...
    assert max(map(len, chunks)) <= 8192 + 256  # ... to read_chunk_max_bytes (+ a partial line)
    assert reader.status.chunks < len(burst) // 1024  # fewer reads than at the base size
    one = line(2.0)
    await send(w, one, reader.status)  # caught up: the next small write arrives alone
    assert await reader.chunk() == one


async def test_crlf_blank_and_garbage_lines_reach_the_parser_which_skips_them(
    server: FeedServer,
) -> None:
    settings = ExchangeSettings(name="exchange1", port=server.port)
    source = build_json_source(settings, DEFAULT_PAIRS, PIPELINE, clock)
    queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue()
    task = asyncio.create_task(source.producer.run(queue, source.status))
    try:
        w = await server.connection()
        data = line(1.0).replace(b"\n", b"\r\n") + b"\r\n\n" + b"garbage{\n" + line(2.0)
        await send(w, data[:7], source.status)
        await send(w, data[7:], source.status)
        chunks = [(await asyncio.wait_for(queue.get(), 5))[0]]
        while sum(map(len, chunks)) < len(data):
            chunks.append((await asyncio.wait_for(queue.get(), 5))[0])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    ticks = [t for c in chunks for t in source.parser.parse(c, clock()).ticks()]

    assert ticks == [("BTCUSDT", 1.0, TS), ("BTCUSDT", 2.0, TS)]
    assert source.status.rejects.counts == {"bad_json": 1}
    assert source.status.protocol == "json"


async def test_reconnect_starts_with_a_fresh_buffer(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    reader = reader_factory(server.port)
    w1 = await server.connection()
    await send(
        w1, line(1.0) + b'{"symbol":"BTCUSDT","pri', reader.status
    )  # half a line, then the drop
    w1.close()

    w2 = await server.connection()
    await send(w2, line(2.0), reader.status)

    assert await reader.chunk() == line(1.0)
    assert await reader.chunk() == line(2.0)  # nothing of the old half line glued to it
    assert reader.status.reconnects == 1
    assert reader.status.connect_attempts == 2
    assert reader.status.last_error == "connection closed by the exchange"


async def test_line_longer_than_max_is_dropped_whole_and_counted(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    reader = reader_factory(server.port)
    w = await server.connection()

    await send(w, line(1.0) + b"x" * 200, reader.status)
    await send(
        w, b"y" * 200, reader.status
    )  # 400 bytes without a newline: over max_line_bytes = 256
    await send(w, b"z" * 100, reader.status)  # still the same long line: skipped, not counted again
    await send(w, b"zz\n" + line(2.0), reader.status)

    assert await reader.chunk() == line(1.0)
    assert await reader.chunk() == line(2.0)
    assert reader.status.rejects.counts == {"line_too_long": 1}
    assert reader.status.rejects.samples["line_too_long"].startswith(b"x" * 200)
    assert reader.queue.empty()


async def test_silent_connection_is_marked_stale_and_reconnected(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    reader = reader_factory(server.port)
    w1 = await server.connection()
    await send(w1, line(1.0), reader.status)
    assert await reader.chunk() == line(1.0)

    w2 = await server.connection(within_s=3.0)  # after stale_after_s = 0.3 of silence

    assert reader.status.stale
    assert reader.status.reconnects == 1
    assert reader.status.last_error.startswith("no data for")
    await send(w2, line(2.0), reader.status)
    assert await reader.chunk() == line(2.0)
    assert not reader.status.stale
    assert reader.status.connected


async def test_waiting_for_room_in_the_queue_is_not_silence(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    """Back-pressure from our own queue for longer than stale_after_s (0.3 s) is not the
    exchange going silent: no stale mark, no reconnect; a silence after it still is one."""
    reader = reader_factory(server.port, maxsize=1)
    w = await server.connection()
    await send(w, line(1.0), reader.status)  # fills the queue
    await send(w, line(2.0), reader.status)  # read; the producer waits to put it
    await asyncio.sleep(1.0)  # three stale timeouts with the producer parked on put()
    assert not reader.status.stale
    assert reader.status.reconnects == 0
    assert await reader.chunk() == line(1.0)
    assert await reader.chunk() == line(2.0)
    await send(w, line(3.0), reader.status)
    assert await reader.chunk() == line(3.0)
    assert reader.status.reconnects == 0
    await server.connection(within_s=3.0)  # now silent while reading: stale, reconnected
    assert reader.status.stale
    assert reader.status.reconnects == 1


async def test_full_queue_stops_reading_so_tcp_pushes_back(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    pipeline = PIPELINE.model_copy(update={"read_chunk_bytes": 65536, "stale_after_s": 30.0})
    reader = reader_factory(server.port, pipeline, maxsize=2)
    w = await server.connection()
    block = line(1.0) * 1000  # ~60 KB
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            w.write(block)
            sent += len(block)
            await w.drain()  # blocks once the socket buffers are full

    flooder = asyncio.create_task(flood())
    try:
        # Queue full and the sender's writes no longer drain: its socket buffer is full.
        await until(lambda: reader.queue.full() and w.transport.get_write_buffer_size() > 0)
        await settle()  # whatever was ready runs until it blocks (a last chunk may be read)
        read_when_full = reader.status.bytes_in
        sent_when_full = sent
        await settle()

        # The producer is parked on queue.put: it reads nothing more, so the sender stalls.
        assert reader.status.bytes_in == read_when_full
        assert sent == sent_when_full
        assert read_when_full < 1_000_000  # queue (2 chunks) + the stream's own small buffer

        for _ in range(20):  # a consumer resumes: reading resumes
            await reader.chunk()
        assert reader.status.bytes_in > read_when_full
    finally:
        flooder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooder


async def test_unreachable_exchange_is_retried_with_logged_attempts_until_it_comes_up(
    reader_factory: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "marketflow.feeds.json")
    port = free_port()
    reader = reader_factory(port)

    await until(lambda: reader.status.connect_attempts >= 3)
    assert not reader.status.connected
    assert "ConnectionRefusedError" in reader.status.last_error
    failures = [r.getMessage() for r in caplog.records if "feed_connect_failed" in r.getMessage()]
    assert failures[0].startswith("feed_connect_failed exchange=exchange1 attempt=1 retry_in_s=")

    late = FeedServer()
    await late.start(port)
    try:
        w = await late.connection()
        await send(w, line(7.0), reader.status)
        assert await reader.chunk() == line(7.0)
        assert reader.status.connected
    finally:
        await late.close()


async def test_cancel_stops_the_producer_and_closes_the_connection(
    server: FeedServer, reader_factory: Callable[..., Reader]
) -> None:
    reader = reader_factory(server.port)
    await server.connection()
    await until(lambda: reader.status.connected)

    reader.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader.task

    assert not reader.status.connected


def test_source_parser_rejects_prices_above_the_configured_maximum() -> None:
    settings = ExchangeSettings(name="exchange1", port=40101)
    source = build_json_source(settings, DEFAULT_PAIRS, PipelineSettings(max_price=10.0), clock)

    batch = source.parser.parse(line(10.0) + line(10.5), clock())

    assert batch.ticks() == [("BTCUSDT", 10.0, TS)]
    assert source.status.rejects.counts == {"price_out_of_range": 1}


def test_reads_grow_by_default_only_for_a_feed_of_hundreds_of_pairs() -> None:
    p = PipelineSettings()
    assert p.read_chunk_max_bytes == 0  # auto
    small = TcpJsonProducer("127.0.0.1", 1, p, time.time_ns, pairs=len(DEFAULT_PAIRS))
    many = TcpJsonProducer("127.0.0.1", 1, p, time.time_ns, pairs=AUTO_GROWTH_PAIRS)
    assert (small.max_read_bytes(), many.max_read_bytes()) == (65536, AUTO_GROWTH_FACTOR * 65536)
    fixed = p.model_copy(update={"read_chunk_max_bytes": 131072})
    assert TcpJsonProducer("127.0.0.1", 1, fixed, time.time_ns, pairs=5).max_read_bytes() == 131072
    source = build_json_source(
        ExchangeSettings(name="ex", port=1), [f"P{i}" for i in range(150)], p, time.time_ns
    )
    assert isinstance(source.producer, TcpJsonProducer)
    assert source.producer.max_read_bytes() == AUTO_GROWTH_FACTOR * 65536
