"""The WebSocket feed against the in-process WebSocket venue simulator (a real aiohttp server
on a real port), through the real ingest pipeline: ticks and books arrive, and after the venue
stops and comes back on the same port the feed reconnects and subscribes again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import orjson
import pytest

from marketflow.adapters.feeds.websocket import build_websocket_source
from marketflow.adapters.feeds.ws_messages import WsItem
from marketflow.app.ingest import RunningSource
from marketflow.domain.feeds import Source
from marketflow.domain.ticks import BookUpdate, Tick, TickBatch
from marketflow.settings import DEFAULT_PAIRS, ExchangeSettings, PipelineSettings
from marketflow.simulator.ws_venue import WsVenue

PIPELINE = PipelineSettings(reconnect_initial_s=0.05, reconnect_max_s=0.3, stale_after_s=3.0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def until(cond: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def logged_trades(path: Path) -> Counter[Tick]:
    rows = (orjson.loads(line) for line in path.read_bytes().splitlines())
    return Counter((r["symbol"], r["price"], r["timestamp"]) for r in rows)


class Pipeline:
    """A WebSocket source in the real ingest pipeline (5 workers), collecting every batch."""

    def __init__(self, port: int, subscribe: Literal["url", "message"]) -> None:
        settings = ExchangeSettings(
            name="wsvenue", port=port, protocol="websocket", ws_subscribe=subscribe
        )
        self.source: Source[WsItem] = build_websocket_source(
            settings, DEFAULT_PAIRS, PIPELINE, now_ms
        )
        self.fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
        self.running = RunningSource(self.source, self.fanin, 5, 64)  # type: ignore[arg-type]
        self.ticks: Counter[Tick] = Counter()
        self.books: list[BookUpdate] = []

    def collect(self) -> int:
        while not self.fanin.empty():
            batch = self.fanin.get_nowait()
            self.ticks.update(batch.ticks())
            self.books.extend(batch.books)
        return sum(self.ticks.values())


@pytest.mark.parametrize("subscribe", ["url", "message"])
async def test_feed_gets_ticks_and_books_and_resubscribes_after_a_venue_restart(
    tmp_path: Path, subscribe: Literal["url", "message"]
) -> None:
    log_path = tmp_path / "trades.jsonl"
    venue = WsVenue(port=0, rate=500, seed=3, trade_log=log_path)
    await venue.start()
    feed = Pipeline(venue.port, subscribe)
    status = feed.source.status
    try:
        await until(lambda: feed.collect() >= 50 and len(feed.books) >= 50)
        assert status.connected
        assert venue.subscribes == 1
        assert {b.symbol for b in feed.books} == set(DEFAULT_PAIRS)
        assert all(b.bid is not None and b.ask is not None and b.bid < b.ask for b in feed.books)

        await venue.aclose()  # the venue goes away: the feed sees the close, retries
        await until(lambda: not status.connected and status.connect_attempts >= 2)
        before = feed.collect()
        await venue.start()  # back on the same port

        await until(lambda: status.connected and feed.collect() >= before + 50)
        assert status.reconnects >= 1
        assert venue.subscribes == 2  # subscribed again on the new connection
    finally:
        await feed.running.stop()
        await venue.aclose()
    feed.collect()
    assert status.rejects.counts == {}
    # Every tick is a trade the venue sent, exactly once (the venue logs what it sent).
    assert feed.ticks <= logged_trades(log_path)
    assert sum(feed.ticks.values()) == status.ticks


async def test_a_stale_link_is_marked_and_reconnected() -> None:
    """A venue that keeps the link alive with pings but stops sending data: stale, then a new
    connection, and fresh once data flows again."""
    venue = WsVenue(port=0, rate=200, seed=4)
    await venue.start()
    pipeline = PipelineSettings(reconnect_initial_s=0.05, reconnect_max_s=0.2, stale_after_s=0.5)
    settings = ExchangeSettings(name="wsvenue", port=venue.port, protocol="websocket")
    source = build_websocket_source(settings, DEFAULT_PAIRS, pipeline, now_ms)
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    running = RunningSource(source, fanin, 5, 64)  # type: ignore[arg-type]
    status = source.status
    try:
        await until(lambda: status.ticks > 0)
        venue.silent = True  # pings only: pings do not count as data
        await until(lambda: status.stale and status.reconnects >= 1)
        assert status.last_error == "no data for 0.5s"
        venue.silent = False
        ticks = status.ticks
        await until(lambda: not status.stale and status.ticks > ticks)
    finally:
        await running.stop()
        await venue.aclose()
