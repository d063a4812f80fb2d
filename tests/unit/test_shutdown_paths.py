"""Issue 9 defects 5 and 9: what a stop or a fallback used to drop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from marketflow.adapters.sqlite.minute_store import open_sqlite
from marketflow.app.ingest import RunningSource
from marketflow.bootstrap import Daemon
from marketflow.domain.feeds import FeedStatus, Source
from marketflow.domain.ticks import TickBatch
from marketflow.settings import Settings


class BlockedProducer:
    """Reads ``items`` as fast as it can; with a tiny queue it ends up blocked on a put."""

    def __init__(self, items: int) -> None:
        self.items = items
        self.read = 0
        self.blocked = asyncio.Event()  # set when a put has to wait: it holds an item

    async def run(self, out: asyncio.Queue[tuple[int, int]], status: FeedStatus) -> None:
        status.connected = True
        for i in range(self.items):
            self.read += 1
            if out.full():
                self.blocked.set()
            await out.put((i, 0))
        await asyncio.Event().wait()


class CountingParser:
    def parse(self, item: int, received_ms: int) -> TickBatch:
        return TickBatch("ex1", {"BTCUSDT": [(1.0 + item, 1_795_482_600_000)]}, received_ms, 1)


async def test_a_chunk_held_while_the_source_queue_is_full_is_parsed_at_stop() -> None:
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue(1)  # the aggregator is "slow": tiny
    producer = BlockedProducer(50)
    source = Source(FeedStatus("ex1", "json"), producer, CountingParser())
    running = RunningSource(source, fanin, workers=2, queue_size=2)  # type: ignore[arg-type]
    # fan-in full, workers blocked, source queue full: the producer waits with one in hand
    await asyncio.wait_for(producer.blocked.wait(), 5)
    folded: list[TickBatch] = []

    async def drain() -> None:
        while True:
            folded.append(await fanin.get())
            fanin.task_done()

    consumer = asyncio.create_task(drain())
    await running.stop()
    await fanin.join()
    consumer.cancel()
    assert len(folded) == producer.read  # every item read, the held one included


def _settings(tmp_path: Path, **pg: object) -> Settings:
    return Settings(
        http={"host": "127.0.0.1", "port": 0},
        postgres={"dsn": "postgresql://nobody@127.0.0.1:1/none", "connect_timeout_s": 0.2, **pg},
        redis={"url": ""},
        embedded={"data_dir": str(tmp_path)},
        capture={"enabled": False},
        exchanges=(),
    )


async def test_a_spill_meant_for_postgres_is_never_drained_into_the_sqlite_fallback(
    tmp_path: Path,
) -> None:
    # Defect 5: PostgreSQL down at start -> SQLite fallback drained the PostgreSQL spill and
    # deleted it; those rows never reached PostgreSQL.
    spill = tmp_path / "spill"
    spill.mkdir()
    legacy = spill / "minutes.jsonl"  # as older versions named it, for any store
    row = {"exchange": "ex1", "symbol": "BTCUSDT", "minute_ms": 1_795_482_600_000,
           "average": 1.0, "low": 1.0, "high": 1.0, "count": 1}  # fmt: skip
    legacy.write_bytes(orjson.dumps(row) + b"\n")
    meant_for_pg = spill / "minutes-postgres-0123456789abcdef.jsonl"
    meant_for_pg.write_bytes(orjson.dumps(row) + b"\n")
    daemon = Daemon(_settings(tmp_path), serve_http=False)
    await daemon.start()
    try:
        assert daemon.store.kind == "sqlite"
        assert await daemon.store.minutes_since(0) == []
    finally:
        await daemon.stop()
    assert legacy.exists()
    assert meant_for_pg.exists()


async def test_stop_completes_and_flushes_when_the_aggregator_task_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defect 9: stop() waited forever on the fan-in join once the aggregator task was dead.
    daemon = Daemon(_settings(tmp_path), serve_http=False)
    await daemon.start()
    fold = daemon.aggregator.fold
    boom = True

    def failing_once(batch: TickBatch) -> None:
        nonlocal boom
        if boom:
            boom = False
            raise RuntimeError("a bug in fold")
        fold(batch)

    monkeypatch.setattr(daemon.aggregator, "fold", failing_once)
    minute = int(time.time()) // 60 * 60_000
    await daemon.fanin.put(TickBatch("ex1", {"BTCUSDT": [(1.0, minute)]}, minute, 1))
    await asyncio.wait_for(daemon.died.wait(), 5)
    for i in range(3):  # read after the death: must still be folded and written
        await daemon.fanin.put(TickBatch("ex1", {"BTCUSDT": [(2.0, minute + i)]}, minute, 1))
    await asyncio.wait_for(daemon.stop(), 10)
    async with await open_sqlite(tmp_path / "marketflow.sqlite3") as store:
        (row,) = await store.minutes_since(0)
    assert (row.count, row.high) == (3, 2.0)


async def test_stop_before_start_is_safe_and_a_failing_close_skips_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await Daemon(_settings(tmp_path), serve_http=False).stop()  # nothing opened: no error
    daemon = Daemon(_settings(tmp_path), serve_http=False)
    await daemon.start()
    closed: list[str] = []

    async def failing_writer_close() -> None:
        closed.append("writer")
        raise OSError("disk gone")

    # The exit stack holds the bound methods taken at start: replace what they call.
    monkeypatch.setattr(daemon.writer, "_attempt", failing_writer_close)
    monkeypatch.setattr(daemon.writer, "_pending", {("ex1", "BTCUSDT", 0): None})
    with pytest.raises(OSError, match="disk gone"):
        await daemon.stop()
    assert closed == ["writer"]
    assert await daemon.cache.ping() is False  # closed after the failing writer
    assert await daemon.store.ping() is False
