"""The WebSocket producer against a local aiohttp server that the test scripts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from marketflow.adapters.feeds.websocket import (
    WebSocketProducer,
    build_websocket_source,
    stream_names,
    venue_url,
)
from marketflow.adapters.feeds.ws_messages import WsItem
from marketflow.app.ingest import SourceQueue
from marketflow.bootstrap import live_source
from marketflow.devstack import SIMULATORS
from marketflow.domain.feeds import FeedStatus
from marketflow.settings import ExchangeSettings, PipelineSettings, Settings, load_settings
from marketflow.simulator.ws_venue import _parse_args as ws_venue_args

PIPELINE = PipelineSettings(
    max_line_bytes=1024,
    stale_after_s=0.5,
    reconnect_initial_s=0.01,
    reconnect_max_s=0.05,
)
PAIRS = ("BTCUSDT", "ETHUSDT")
Handler = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]


def clock() -> int:
    return time.time_ns() // 1_000_000


def trade(i: int) -> str:
    data = {"e": "trade", "s": "BTCUSDT", "t": i, "p": f"{100 + i}.5", "T": 1_795_482_633_100}
    return orjson.dumps({"stream": "btcusdt@trade", "data": data}).decode()


async def until(cond: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Venue:
    """An aiohttp server on a free port; each WebSocket connection runs ``handler``."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.requests: list[web.Request] = []
        self.received: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream", self._ws)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.requests.append(request)
        assert self.handler is not None
        await self.handler(ws, request)
        return ws

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def venue() -> AsyncIterator[Venue]:
    v = Venue()
    await v.start()
    yield v
    await v.close()


def settings(port: int, **extra: object) -> ExchangeSettings:
    return ExchangeSettings(name="wsv", port=port, protocol="websocket", **extra)


class Feed:
    """A producer running into a plain queue, with its status."""

    def __init__(self, producer: WebSocketProducer) -> None:
        self.producer = producer
        self.queue: asyncio.Queue[tuple[WsItem, int]] = asyncio.Queue()
        self.status = FeedStatus("wsv", "websocket")
        self.task = asyncio.create_task(producer.run(self.queue, self.status))

    def frames(self) -> list[str | bytes]:
        out: list[str | bytes] = []
        while not self.queue.empty():
            out.extend(self.queue.get_nowait()[0])
        return out

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def feed_of(port: int, **extra: object) -> Feed:
    source = build_websocket_source(settings(port, **extra), PAIRS, PIPELINE, clock)
    assert isinstance(source.producer, WebSocketProducer)
    return Feed(source.producer)


def test_url_names_every_stream_of_every_pair() -> None:
    streams = stream_names(PAIRS)
    assert streams == ["btcusdt@trade", "btcusdt@bookTicker", "ethusdt@trade", "ethusdt@bookTicker"]
    assert str(venue_url(settings(9), streams)) == (
        "ws://127.0.0.1:9/stream?streams=btcusdt@trade/btcusdt@bookTicker/"
        "ethusdt@trade/ethusdt@bookTicker"
    )
    tls = venue_url(settings(9, tls=True, ws_path="/ws", ws_subscribe="message"), streams)
    assert str(tls) == "wss://127.0.0.1:9/ws"


async def test_frames_that_arrive_together_travel_as_one_item(venue: Venue) -> None:
    async def burst(ws: web.WebSocketResponse, request: web.Request) -> None:
        for i in range(50):  # no await between the writes: one TCP segment, one read
            await ws.send_str(trade(i))
        await ws.receive()  # until the client goes

    venue.handler = burst
    feed = feed_of(venue.port)
    frames: list[str | bytes] = []
    items = 0

    def drained() -> bool:
        nonlocal items
        items += feed.queue.qsize()
        frames.extend(feed.frames())
        return len(frames) >= 50

    try:
        await until(drained)
    finally:
        await feed.stop()
    assert frames == [trade(i) for i in range(50)]  # all, in order, none twice
    assert items < 50  # several frames per item, not one each
    assert feed.status.chunks == items
    query = venue.requests[0].query["streams"]
    assert query.split("/") == stream_names(PAIRS)


async def test_subscribe_message_is_sent_again_on_every_connection(venue: Venue) -> None:
    async def subscribe_then_close(ws: web.WebSocketResponse, request: web.Request) -> None:
        msg = await ws.receive()
        venue.received.append(msg.data)
        await ws.send_str(
            orjson.dumps({"result": None, "id": orjson.loads(msg.data)["id"]}).decode()
        )
        await ws.send_str(trade(1))
        await ws.close()

    venue.handler = subscribe_then_close
    feed = feed_of(venue.port, ws_subscribe="message")
    try:
        await until(lambda: len(venue.received) >= 2)
    finally:
        await feed.stop()
    first, second = (orjson.loads(m) for m in venue.received[:2])
    assert first == {"method": "SUBSCRIBE", "params": stream_names(PAIRS), "id": 1}
    assert second == {**first, "id": 2}
    assert "streams" not in venue.requests[0].query
    assert feed.status.reconnects >= 1
    assert feed.status.last_error == "connection closed by the venue"


async def test_pings_alone_do_not_keep_the_feed_fresh(venue: Venue) -> None:
    async def ping_only(ws: web.WebSocketResponse, request: web.Request) -> None:
        if len(venue.requests) == 1:
            await ws.send_str(trade(1))  # data once, on the first connection only
        with contextlib.suppress(ConnectionError):
            while not ws.closed:
                await ws.ping()  # ten times per stale period
                await asyncio.sleep(0.05)

    venue.handler = ping_only
    feed = feed_of(venue.port)
    try:
        await until(lambda: feed.status.stale and feed.status.reconnects >= 2)
    finally:
        await feed.stop()
    assert feed.status.last_error == "no data for 0.5s"


async def test_a_frame_too_large_is_counted_and_the_feed_reconnects(venue: Venue) -> None:
    async def too_large(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_str(trade(1))
        await ws.send_str("x" * 2000)  # max_line_bytes is 1024
        await ws.receive()

    venue.handler = too_large
    feed = feed_of(venue.port)
    try:
        await until(lambda: feed.status.rejects.counts.get("frame_too_large", 0) >= 2)
    finally:
        await feed.stop()
    assert feed.status.reconnects >= 1
    assert "websocket error" in feed.status.last_error


async def test_a_refused_handshake_is_retried_and_reported(venue: Venue) -> None:
    feed = feed_of(venue.port, ws_path="/nowhere")
    try:
        await until(lambda: feed.status.connect_attempts >= 3)
    finally:
        await feed.stop()
    assert not feed.status.connected
    assert "404" in feed.status.last_error
    assert venue.requests == []


def test_bootstrap_builds_a_websocket_source_for_protocol_websocket() -> None:
    ex = settings(40121)
    source = live_source(ex, Settings(exchanges=(ex,)), lambda: None)
    assert isinstance(source.producer, WebSocketProducer)
    assert source.status.protocol == "websocket"
    assert source.status.address == "ws://127.0.0.1:40121/stream"


def test_make_run_starts_the_websocket_venue_config_toml_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [k for k in os.environ if k.startswith("MARKETFLOW_")]:
        monkeypatch.delenv(key)
    loaded = load_settings(Path(__file__).parents[2] / "config.toml")
    [ws] = [e for e in loaded.exchanges if e.protocol == "websocket"]
    assert (ws.name, ws.port, ws.ws_path, ws.tls, ws.ws_subscribe) == (
        "wsvenue", 40121, "/stream", False, "url",
    )  # fmt: skip
    assert ws.port in {port for protocol, port, _ in SIMULATORS if protocol == "websocket"}


@pytest.mark.parametrize("path", ["stream", "/a b", "/x?streams=y"])
def test_ws_path_must_be_a_plain_absolute_path(path: str) -> None:
    with pytest.raises(ValueError, match="ws_path"):
        settings(1, ws_path=path)


async def test_a_burst_read_when_stopped_on_a_full_queue_is_kept_not_dropped(
    venue: Venue,
) -> None:
    async def one_burst(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_str(trade(1))
        await ws.receive()

    venue.handler = one_burst
    source = build_websocket_source(settings(venue.port), PAIRS, PIPELINE, clock)
    queue: SourceQueue[WsItem] = SourceQueue(1)
    queue.put_nowait(([trade(0)], 0))  # full: the producer's put must wait
    status = FeedStatus("wsv", "websocket")
    task = asyncio.create_task(source.producer.run(queue, status))
    await until(lambda: status.chunks == 1)  # read, and blocked on the full queue
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert [frames for frames, _ in queue.held] == [[trade(1)]]


def test_make_run_arguments_of_the_websocket_venue_are_accepted() -> None:
    [(_, port, extra)] = [s for s in SIMULATORS if s[0] == "websocket"]
    args = ws_venue_args(["--port", str(port), *extra])
    assert (args.port, args.offset, args.tick_bp) == (40121, -1e-4, 1.0)
