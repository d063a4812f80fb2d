"""``GET /stream`` (WebSocket) and ``GET /stream/sse`` (Server-Sent Events): the stream hub
(app/stream_hub.py) served over aiohttp.

WebSocket: the client sends ``{"op": "subscribe", "channels": [...], "symbols": [...]}``
(symbols omitted: all) or ``"unsubscribe"``; the server answers ``subscribed``, then one
``snapshot`` per channel, then ``update`` frames at the hub's cadence (JSON text frames). A bad
message gets an ``error`` frame and the connection lives. aiohttp's heartbeat pings every
``stream.heartbeat_s``; a client that does not answer is closed.

SSE: ``?channels=bbo,ticks&symbols=BTCUSDT`` (symbols omitted: all); each event has ``id:``
(the hub's round), ``event: <channel>`` and ``data:`` (the same JSON as the WebSocket frame).
A reconnect with ``Last-Event-ID`` gets a fresh snapshot: resumption from the snapshot, not a
replay of what was missed. Comment lines keep idle connections open.

Both check the Origin header before anything else (403 JSON): no Origin (curl, bots), the
daemon's own host, or one of ``stream.allowed_origins``. Past ``stream.max_connections``:
503 JSON. Bad query parameters: 400 JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from marketflow.app.stream_hub import Bundle, Frame, Refused, StreamHub, SubscribeError
from marketflow.domain.errors import BadRequest
from marketflow.entrypoints.http_common import ApiError, follow_convention
from marketflow.settings import StreamSettings

STREAM_HUB: web.AppKey[StreamHub] = web.AppKey("stream_hub", StreamHub)
STREAM_SETTINGS: web.AppKey[StreamSettings] = web.AppKey("stream_settings", StreamSettings)

CLOSE_TIMEOUT_S = 5.0  # a client that never reads gets this long to take its close frame
MAX_CLIENT_MESSAGE = 64 * 1024  # subscribe messages are small; aiohttp closes above (1009)
SSE_RETRY_MS = 2000


def bound_kernel_buffer(request: web.Request, max_buffered_bytes: int) -> None:
    """Cap the kernel's send buffer of a stream connection at half the bound (Linux doubles
    it): otherwise a client that stops reading hides megabytes in the kernel (autotuned
    buffers) before its backlog shows in the transport, and is found out minutes late."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:  # asyncio's TransportSocket: setsockopt passes through
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(4096, max_buffered_bytes // 2))


def _transport_buffered(request: web.Request) -> int:
    transport = request.transport
    return 0 if transport is None else transport.get_write_buffer_size()


def _abort_later(transport: asyncio.Transport | None) -> None:
    """A closed transport still sends what it holds (the close frame last); one whose client
    never reads it is dropped after ``CLOSE_TIMEOUT_S`` (a no-op once it is gone)."""
    if transport is not None and not transport.is_closing():
        transport.close()
    if transport is not None:
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.abort)


def ws_text_frame(body: bytes) -> bytes:
    """``body`` as one unmasked, uncompressed WebSocket text frame (RFC 6455 5.2)."""
    n = len(body)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = b"\x81\x7e" + n.to_bytes(2, "big")
    else:
        head = b"\x81\x7f" + n.to_bytes(8, "big")
    return head + body


class WebSocketSink:
    """A stream client on a WebSocket: frames as JSON text messages.

    ``try_send`` writes the frame's bytes, framed once for every client, straight to the
    transport (one whole frame per write, so aiohttp's own pings and close frames never
    interleave with it); the connection negotiates no compression, which would make every
    client's bytes its own."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self._request = request
        # The connection's transport, kept: request.transport is a property chain, and once
        # the connection is gone the kept one says so (is_closing, nothing buffered).
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client gone before the upgrade")
        self._transport = transport

    async def send(self, frame: Frame) -> None:
        if self._ws.closed:
            raise ConnectionResetError("websocket closed")
        await self._ws.send_frame(frame.body, WSMsgType.TEXT)

    def try_send(self, frame: Frame) -> bool:
        if not self._writable():
            return False
        self._transport.write(self._wire(frame))
        return True

    def try_send_bundle(self, bundle: Bundle) -> bool:
        if not self._writable():
            return False
        wire = bundle.wires.get("ws")
        if wire is None:
            wire = bundle.wires["ws"] = b"".join(self._wire(f) for f in bundle.frames)
        self._transport.write(wire)
        return True

    def _writable(self) -> bool:
        """Open, and nothing of ours waiting in the transport: a write now goes out whole."""
        transport = self._transport
        return not (transport.get_write_buffer_size() or transport.is_closing() or self._ws.closed)

    @staticmethod
    def _wire(frame: Frame) -> bytes:
        wire = frame.wire.get("ws")
        if wire is None:
            wire = frame.wire["ws"] = ws_text_frame(frame.body)
        return wire

    def buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    async def close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            pass
        _abort_later(self._transport)


class SseSink:
    """A stream client on a text/event-stream response."""

    def __init__(self, response: web.StreamResponse, request: web.Request) -> None:
        self._response = response
        self._request = request
        self.closed = asyncio.Event()

    async def send(self, frame: Frame) -> None:
        chunk = frame.wire.get("sse")
        if chunk is None:
            event = (frame.channel or frame.kind).encode()
            chunk = frame.wire["sse"] = b"id: %d\nevent: %s\ndata: %s\n\n" % (
                frame.seq,
                event,
                frame.body,
            )
        await self._write(chunk)

    def try_send(self, frame: Frame) -> bool:
        return False  # the response's chunked encoding is aiohttp's: its writer only

    def try_send_bundle(self, bundle: Bundle) -> bool:
        return False

    async def comment(self, text: bytes) -> None:
        await self._write(b": " + text + b"\n\n")

    async def _write(self, chunk: bytes) -> None:
        if self.closed.is_set() or self._request.transport is None:
            raise ConnectionResetError("event stream closed")
        try:
            await self._response.write(chunk)
        except ConnectionError:
            self.closed.set()
            raise

    def buffered(self) -> int:
        return _transport_buffered(self._request)

    async def close(self, code: int, reason: str) -> None:
        # SSE has no close code: say why in a comment, then end the response.
        transport = self._request.transport
        with contextlib.suppress(ConnectionError, RuntimeError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.comment(b"closed %d %s" % (code, reason.encode()))
        self.closed.set()
        _abort_later(transport)


def check_origin(request: web.Request, allowed: tuple[str, ...]) -> None:
    """403 unless no Origin, the daemon's own host, or an allowed origin (or "*")."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return
    wanted = origin.strip().lower().rstrip("/")
    if wanted in (a.lower().rstrip("/") for a in allowed):
        return
    host = (request.host or "").lower()
    if host and urlsplit(wanted).netloc == host:
        return
    raise ApiError(403, "origin not allowed (stream.allowed_origins)")


async def stream_ws(request: web.Request) -> web.StreamResponse:
    hub = request.app[STREAM_HUB]
    cfg = request.app[STREAM_SETTINGS]
    check_origin(request, cfg.allowed_origins)
    if set(request.query):
        raise BadRequest("GET /stream takes no query parameters: send a subscribe message")
    ws = web.WebSocketResponse(
        heartbeat=cfg.heartbeat_s, max_msg_size=MAX_CLIENT_MESSAGE, compress=False
    )
    if not ws.can_prepare(request).ok:
        raise BadRequest("GET /stream is a WebSocket: send Upgrade: websocket")
    try:
        sub = hub.connect(WebSocketSink(ws, request))
    except Refused as exc:
        raise ApiError(503, str(exc), {"Retry-After": "5"}) from exc
    try:
        await ws.prepare(request)
        bound_kernel_buffer(request, cfg.max_buffered_bytes)
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                hub.handle(sub, msg.data)
    finally:
        hub.disconnect(sub)
    return ws


def _list_param(request: web.Request, name: str) -> list[str] | None:
    values = request.query.getall(name, ())
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    items = [v.strip() for v in values[0].split(",")]
    if not all(items):
        raise BadRequest(f"{name} must be a comma-separated list of names")
    return items


async def stream_sse(request: web.Request) -> web.StreamResponse:
    hub = request.app[STREAM_HUB]
    cfg = request.app[STREAM_SETTINGS]
    check_origin(request, cfg.allowed_origins)
    unknown = set(request.query) - {"channels", "symbols"}
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:100]}")
    last_id = request.headers.get("Last-Event-ID")
    if last_id is not None and not (last_id.isascii() and last_id.strip().isdigit()):
        raise BadRequest("Last-Event-ID must be an event id this stream sent")
    try:
        channels, symbols = hub.check(_list_param(request, "channels"),
                                      _list_param(request, "symbols"))  # fmt: skip
    except SubscribeError as exc:
        raise BadRequest(str(exc)) from exc
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # proxies must not hold events back
    })  # fmt: skip
    sink = SseSink(response, request)
    try:
        sub = hub.connect(sink)
    except Refused as exc:
        raise ApiError(503, str(exc), {"Retry-After": "5"}) from exc
    try:
        try:
            hub.plan(sub, channels, symbols)  # over the cap: 400 before the stream starts
        except SubscribeError as exc:
            raise BadRequest(str(exc)) from exc
        await response.prepare(request)
        bound_kernel_buffer(request, cfg.max_buffered_bytes)
        await response.write(b"retry: %d\n\n" % SSE_RETRY_MS)
        if last_id is not None:
            await sink.comment(b"resumed from a fresh snapshot (no replay)")
        hub.subscribe(sub, channels, symbols)
        while not sub.done.is_set():
            try:
                async with asyncio.timeout(cfg.sse_keepalive_s):
                    await sub.done.wait()
            except TimeoutError:
                if sub.idle:
                    await sink.comment(b"keepalive")
    except ConnectionError:
        pass  # the client went away
    finally:
        hub.disconnect(sub)
    return response


def add_stream_routes(app: web.Application, hub: StreamHub, settings: StreamSettings) -> None:
    """``GET /stream`` and ``GET /stream/sse`` on ``app``; clients are closed (1001) when the
    application shuts down, so a stop never waits on a long-lived connection."""
    follow_convention(app)
    app[STREAM_HUB] = hub
    app[STREAM_SETTINGS] = settings
    app.router.add_get("/stream", stream_ws)
    app.router.add_get("/stream/sse", stream_sse)

    async def close_clients(app: web.Application) -> None:
        await hub.close_clients()

    app.on_shutdown.append(close_clients)
