"""A WebSocket venue (``protocol = "websocket"``): Binance-style combined streams over aiohttp.

The producer connects to ``ws[s]://host:port<ws_path>``, subscribes to ``<pair>@trade`` and
``<pair>@bookTicker`` for every configured pair (in the URL's ``?streams=`` query, or with a
``{"method":"SUBSCRIBE"}`` message after connecting, per ``ws_subscribe``), and puts bursts of
frames on the source queue: after each awaited frame it takes every frame aiohttp has already
buffered (up to ``read_chunk_bytes`` of text) without waiting again, so one queue item, and one
TickBatch, holds whatever one read of the socket brought, not one frame. The worker pool parses
them (ws_messages.py), as for the JSON-lines feed.

Backpressure: ``await queue.put`` blocks while the source queue is full; aiohttp's frame queue
then fills, it stops reading the socket and TCP pushes back on the venue.

Liveness: only data frames count. aiohttp answers the venue's pings by itself and never hands
them to us, and the stale deadline spans them: a link that pings but sends no trade or quote
for ``stale_after_s`` is shown stale and reconnected (then re-subscribed). Binance pings every
few minutes, far beyond any useful stale timeout, so pings could not keep a price feed honest
anyway; a dead TCP link is caught by the same deadline. Reconnects never give up
(marketflow.backoff); each new connection subscribes again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import NoReturn

import aiohttp
import orjson
from yarl import URL

from marketflow.adapters.feeds.ws_messages import CombinedStreamParser, WsItem
from marketflow.backoff import Backoff, reconnect_forever
from marketflow.domain.feeds import Clock, FeedStatus, Source
from marketflow.settings import ExchangeSettings, PipelineSettings

__all__ = ["CombinedStreamParser", "WebSocketProducer", "build_websocket_source", "stream_names"]

log = logging.getLogger("marketflow.feeds.websocket")

WsQueue = asyncio.Queue[tuple[WsItem, int]]
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
_END = (*_CLOSED, aiohttp.WSMsgType.ERROR)


class _Stale(Exception):
    """No data frame for ``stale_after_s``."""


class VenueClosed(ConnectionError):
    """The link failed at the WebSocket level (a protocol error, a frame too large)."""


def stream_names(pairs: Sequence[str]) -> list[str]:
    """The combined-stream names of ``pairs``: ``btcusdt@trade``, ``btcusdt@bookTicker``..."""
    return [f"{p.lower()}@{kind}" for p in pairs for kind in ("trade", "bookTicker")]


def _data_buffered(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """True when the next frame aiohttp has read is a data frame: ``receive()`` returns it
    without waiting (a buffered ping would make ``receive()`` answer it and then wait).
    aiohttp exposes no public look-ahead; its frame queue's ``_buffer`` (a deque of
    ``(message, size)``, public on the Cython build too) is read defensively: without it every
    frame is its own item, slower but still correct."""
    buffer = getattr(getattr(ws, "_reader", None), "_buffer", None)
    try:
        head = buffer[0][0] if buffer else None
    except (TypeError, IndexError, KeyError):
        return False
    kind = getattr(head, "type", None)
    return kind is aiohttp.WSMsgType.TEXT or kind is aiohttp.WSMsgType.BINARY


@dataclass(eq=False)
class WebSocketProducer:
    """Connects to one WebSocket venue, subscribes, and feeds frame bursts to the queue."""

    url: URL
    streams: Sequence[str]
    pipeline: PipelineSettings
    clock: Clock
    _: KW_ONLY
    subscribe_by_message: bool = False
    connect_timeout_s: float = 5.0
    close_timeout_s: float = 1.0
    rng: InitVar[random.Random | None] = None
    backoff: Backoff = field(init=False)
    subscribe_id: int = field(init=False, default=0)  # the id of the last SUBSCRIBE sent

    def __post_init__(self, rng: random.Random | None) -> None:
        p = self.pipeline
        self.backoff = Backoff(p.reconnect_initial_s, p.reconnect_max_s, rng or random.Random())

    async def run(self, out: WsQueue, status: FeedStatus) -> None:
        """Connect, read and reconnect until cancelled."""
        status.address = str(self.url.with_query(None))

        async def connect(http: aiohttp.ClientSession) -> None:
            status.connecting()
            try:
                if await self._connection(http, out, status):
                    self.backoff.reset()  # it delivered data: a restarted venue is back fast
            finally:
                status.connected = False

        def ended(exc: Exception | None, delay: float) -> None:
            if exc is None:
                error = "connection closed by the venue"
            elif isinstance(exc, _Stale):
                status.stale = True
                error = f"no data for {self.pipeline.stale_after_s:g}s"
            elif isinstance(exc, OSError | TimeoutError | aiohttp.ClientError):
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:  # a feed bug: logged with its traceback, retried like an outage
                log.error("feed_failed exchange=%s", status.name, exc_info=exc)
                error = f"{type(exc).__name__}: {exc}"
            status.last_error = error
            log.warning(
                "feed_connect_failed exchange=%s attempt=%d retry_in_s=%.2f error=%s",
                status.name,
                status.connect_attempts,
                delay,
                error,
            )

        # One HTTP client for the producer's life: its connector outlives reconnects.
        async with aiohttp.ClientSession() as http:
            await reconnect_forever(lambda: connect(http), self.backoff, ended)

    async def _connection(
        self, http: aiohttp.ClientSession, out: WsQueue, status: FeedStatus
    ) -> bool:
        """One WebSocket until the venue closes it; True when it delivered any data."""
        p = self.pipeline
        async with asyncio.timeout(self.connect_timeout_s):
            ws = await http.ws_connect(
                self.url,
                autoping=True,
                max_msg_size=p.max_line_bytes,
                timeout=aiohttp.ClientWSTimeout(ws_close=self.close_timeout_s),
            )
        async with ws:
            if self.subscribe_by_message:
                self.subscribe_id += 1
                request = {"method": "SUBSCRIBE", "params": list(self.streams)}
                await ws.send_str(orjson.dumps({**request, "id": self.subscribe_id}).decode())
            status.connected = True
            log.info("feed_connected exchange=%s address=%s", status.name, status.address)
            return await self._pump(ws, out, status)

    async def _pump(
        self, ws: aiohttp.ClientWebSocketResponse, out: WsQueue, status: FeedStatus
    ) -> bool:
        loop = asyncio.get_running_loop()
        stale_s = self.pipeline.stale_after_s
        burst_chars = self.pipeline.read_chunk_bytes
        clock = self.clock
        got_data = False
        while True:
            frames: WsItem = []
            size = 0
            stale = False
            # A deadline, not receive(timeout=...): aiohttp restarts that timeout after each
            # ping it answers, and pings must not keep a silent feed alive.
            try:
                async with asyncio.timeout_at(loop.time() + stale_s):
                    msg = await ws.receive()
                    while True:
                        kind = msg.type
                        if kind is aiohttp.WSMsgType.TEXT or kind is aiohttp.WSMsgType.BINARY:
                            frames.append(msg.data)
                            size += len(msg.data)
                        if kind in _END or size >= burst_chars or not _data_buffered(ws):
                            break
                        msg = await ws.receive()  # a buffered data frame: no wait
            except TimeoutError:
                stale = True
            if frames:
                if not got_data:
                    got_data = True
                    status.stale = False
                status.chunks += 1
                status.bytes_in += size
                # Blocks while the queue is full: aiohttp stops reading the socket meanwhile.
                await out.put((frames, clock()))
            if stale:
                log.warning("feed_stale exchange=%s silent_s=%g", status.name, stale_s)
                raise _Stale
            if msg.type is aiohttp.WSMsgType.ERROR:
                self._failed(msg.data, status)
            if msg.type in _CLOSED:
                return got_data

    @staticmethod
    def _failed(exc: object, status: FeedStatus) -> NoReturn:
        """aiohttp reported a protocol error (and closes the link): count it, reconnect."""
        code = getattr(exc, "code", None)
        if code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
            status.rejects.add("frame_too_large", str(exc).encode())
        raise VenueClosed(f"websocket error: {exc}")


def venue_url(settings: ExchangeSettings, streams: Sequence[str]) -> URL:
    """``ws[s]://host:port<ws_path>``, with ``?streams=a/b/...`` when subscribing by URL."""
    url = URL.build(
        scheme="wss" if settings.tls else "ws",
        host=settings.host,
        port=settings.port,
        path=settings.ws_path,
    )
    if settings.ws_subscribe == "url":
        url = url.with_query({"streams": "/".join(streams)})
    return url


def build_websocket_source(
    settings: ExchangeSettings,
    pairs: Sequence[str],
    pipeline: PipelineSettings,
    clock: Clock,
) -> Source[WsItem]:
    """The ingest source of one ``protocol = "websocket"`` exchange with its parser."""
    streams = stream_names(pairs)
    url = venue_url(settings, streams)
    status = FeedStatus(name=settings.name, protocol="websocket", address=str(url.with_query(None)))
    parser = CombinedStreamParser(
        settings.name, frozenset(pairs), status.rejects, max_price=pipeline.max_price
    )
    producer = WebSocketProducer(
        url,
        streams,
        pipeline,
        clock,
        subscribe_by_message=settings.ws_subscribe == "message",
    )
    return Source(status=status, producer=producer, parser=parser)
