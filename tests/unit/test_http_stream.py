"""GET /stream and GET /stream/sse on a real aiohttp server (loopback), with a fake world view.

The slow-client test: one client stops reading (a raw socket with a small receive buffer
that is never read), one reads everything. The stuck one is conflated, then closed with
1008; the fast one sees, in every frame, the latest seq of each symbol at that round, and
ends on the final value.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from marketflow.app.stream_hub import StreamHub, Subscriber
from marketflow.entrypoints.http_common import JsonErrorsRunner, new_app
from marketflow.entrypoints.http_stream import add_stream_routes
from marketflow.settings import StreamSettings
from tests.unit.stream_kit import SYMBOLS, FakeView

T0 = 1_764_000_000_000


@dataclass
class Served:
    hub: StreamHub
    view: FakeView
    base: str
    port: int
    subs: list[Subscriber]
    rounds: dict[int, dict[str, int]]  # round seq -> the view's seq per symbol at that round


@pytest.fixture
def cfg(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Stream settings for ``served`` (parametrize indirectly); ``pad``: payload bytes."""
    return dict(getattr(request, "param", {}))


@pytest.fixture
async def served(cfg: dict[str, Any]) -> AsyncIterator[Served]:
    pad = cfg.pop("pad", 0)
    settings = StreamSettings(**({"heartbeat_s": 60.0} | cfg))
    view = FakeView(SYMBOLS, pad=pad)
    hub = StreamHub(settings, SYMBOLS, lambda: T0, view=view)
    subs: list[Subscriber] = []
    rounds: dict[int, dict[str, int]] = {}
    connect, deliver = hub.connect, hub.deliver

    def recording_connect(sink: Any) -> Subscriber:
        sub = connect(sink)
        subs.append(sub)
        return sub

    def recording_deliver() -> None:
        deliver()
        rounds[hub._seq] = dict(view.seq)  # what the round built its payloads from

    hub.connect = recording_connect  # type: ignore[method-assign]
    hub.deliver = recording_deliver  # type: ignore[method-assign]
    app = new_app()
    add_stream_routes(app, hub, settings)
    runner = JsonErrorsRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await hub.start()
    try:
        yield Served(hub, view, f"http://127.0.0.1:{port}", port, subs, rounds)
    finally:
        await hub.aclose()
        await runner.cleanup()


async def poll(check: Any, within_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


# -- a raw WebSocket client that can stop reading -----------------------------------------


def _masked(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_connect(port: int, message: bytes) -> socket.socket:
    """Connect with a tiny receive buffer, upgrade, send ``message``; blocking (a thread)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: leave every frame unread in the kernel
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(_masked(message))
    return sock


def read_until_close(sock: socket.socket) -> tuple[int, int]:
    """Read server frames until the close frame: (frames before it, close code)."""
    buf = b""
    frames = 0

    def need(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed without a close frame")
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    while True:
        b0, b1 = need(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", need(8))
        payload = need(n)
        if b0 & 0x0F == 8:
            return frames, struct.unpack("!H", payload[:2])[0]
        frames += 1


SUBSCRIBE_BBO = orjson.dumps({"op": "subscribe", "channels": ["bbo"]})


@pytest.mark.parametrize(
    "cfg", [{"cadence_hz": 50.0, "max_buffered_bytes": 8192, "pad": 200}], indirect=True
)
async def test_a_stuck_client_is_conflated_then_closed_1008_while_a_fast_one_sees_every_change(
    served: Served,
) -> None:
    view, hub = served.view, served.hub
    seen: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{served.base}/stream") as fast,
    ):
        await fast.send_bytes(SUBSCRIBE_BBO)

        async def read_fast() -> None:
            async for msg in fast:
                seen.append(orjson.loads(msg.data))

        reader = asyncio.create_task(read_fast())
        stuck = await asyncio.to_thread(raw_connect, served.port, SUBSCRIBE_BBO)
        try:
            await poll(lambda: len(served.subs) == 2 and bool(served.subs[1].subs))
            stuck_sub = served.subs[1]
            stop = asyncio.Event()

            async def publish() -> None:  # changes far faster than the cadence
                while not stop.is_set():
                    for s in SYMBOLS:
                        view.change(s)
                    await asyncio.sleep(0.002)

            publisher = asyncio.create_task(publish())
            await poll(lambda: hub.slow_closed == 1)
            # Now it reads again: what the server queued, then the close frame (which the
            # server waits CLOSE_TIMEOUT_S for it to take, then drops the connection).
            closing = asyncio.create_task(asyncio.to_thread(read_until_close, stuck))
            await asyncio.sleep(0.3)  # pacing: a few more rounds for the fast client
            stop.set()
            await publisher
            final = dict(view.seq)
            await poll(lambda: {s: last_seq(seen, s) for s in SYMBOLS} == final)
            frames, code = await closing
        finally:
            stuck.close()
        await fast.close()
        await reader

    assert stuck_sub.conflated > 0  # conflated first ...
    assert code == 1008  # ... then closed
    assert frames >= 3  # it got the subscribed and snapshot frames before it stopped reading
    assert hub.stats()["slow_closed"] == 1
    updates = [m for m in seen if m["type"] == "update"]
    assert len(updates) > 5
    for m in updates:  # each seq it saw was the latest at that round
        at_round = served.rounds[m["seq"]]
        assert {s: p["seq"] for s, p in m["data"].items()} == {s: at_round[s] for s in m["data"]}
    assert [m["type"] for m in seen[:2]] == ["subscribed", "snapshot"]


def last_seq(seen: list[dict[str, Any]], symbol: str) -> int:
    for m in reversed(seen):
        if m.get("type") in ("snapshot", "update") and symbol in m["data"]:
            return int(m["data"][symbol]["seq"])
    return 0


async def test_websocket_bad_message_gets_an_error_frame_and_the_link_lives(
    served: Served,
) -> None:
    served.view.change("BTCUSDT")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{served.base}/stream") as ws,
    ):
        await ws.send_str('{"op": "subscribe", "channels": ["nope"]}')
        error = await ws.receive_json(timeout=5)
        await ws.send_str('{"op": "subscribe", "channels": ["bbo"], "symbols": ["BTCUSDT"]}')
        subscribed = await ws.receive_json(timeout=5)
        snapshot = await ws.receive_json(timeout=5)
        served.view.change("BTCUSDT")
        update = await ws.receive_json(timeout=5)

    assert error["type"] == "error"
    assert "unknown channel" in error["error"]
    assert subscribed == {"type": "subscribed", "channels": ["bbo"], "symbols": ["BTCUSDT"]}
    assert snapshot["type"] == "snapshot"
    assert snapshot["data"]["BTCUSDT"]["seq"] == 1
    assert update["type"] == "update"
    assert update["data"]["BTCUSDT"]["seq"] >= 1


@pytest.mark.parametrize("cfg", [{"allowed_origins": ("https://dash.example",)}],
                         indirect=True)  # fmt: skip
async def test_origin_is_checked_before_the_upgrade(served: Served) -> None:
    url = f"{served.base}/stream"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, origin="https://evil.example")
        async with session.get(f"{served.base}/stream/sse?channels=bbo",
                               headers={"Origin": "https://evil.example"}) as sse:  # fmt: skip
            sse_status, sse_body = sse.status, await sse.json()
        for origin in ("https://dash.example", served.base, None):
            async with session.ws_connect(url, origin=origin) as ws:
                await ws.send_str('{"op": "subscribe", "channels": ["status"]}')
                assert (await ws.receive_json(timeout=5))["type"] == "subscribed"

    assert refused.value.status == 403
    assert sse_status == 403
    assert "origin" in sse_body["error"]


@pytest.mark.parametrize("cfg", [{"max_connections": 1}], indirect=True)
async def test_connections_past_the_cap_get_503_and_are_counted(served: Served) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{served.base}/stream"),
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{served.base}/stream")
        async with session.get(f"{served.base}/stream/sse?channels=bbo") as sse:
            sse_status = sse.status

    assert refused.value.status == 503
    assert sse_status == 503
    assert served.hub.stats()["connections_refused"] == 2


@pytest.mark.parametrize(
    ("query", "headers", "says"),
    [
        ("channels=trades", {}, "unknown channel"),
        ("", {}, "channels must"),
        ("channels=bbo&symbols=NOPE", {}, "unknown symbol"),
        ("channels=bbo&depth=3", {}, "unknown query parameter"),
        ("channels=bbo&channels=ticks", {}, "more than once"),
        ("channels=bbo,", {}, "comma-separated"),
        ("channels=bbo", {"Last-Event-ID": "yesterday"}, "Last-Event-ID"),
    ],
)
async def test_sse_bad_parameters_get_400_json(
    served: Served, query: str, headers: dict[str, str], says: str
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{served.base}/stream/sse?{query}", headers=headers) as resp,
    ):
        body = await resp.json()

    assert resp.status == 400
    assert says in body["error"]


async def test_websocket_route_without_an_upgrade_is_400_json(served: Served) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{served.base}/stream") as resp:
        body = await resp.json()

    assert resp.status == 400
    assert "WebSocket" in body["error"]


async def read_event(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The next event (or comment) of an event stream, as its fields (10 s at most)."""
    fields: dict[str, str] = {}
    while True:
        async with asyncio.timeout(10):
            line = (await resp.content.readline()).decode().rstrip("\n")
        if not line:
            if fields:
                return fields
            continue
        name, _, value = line.partition(":")
        fields[name or "comment"] = value.removeprefix(" ")


@pytest.mark.parametrize("cfg", [{"sse_keepalive_s": 0.2}], indirect=True)
async def test_sse_snapshot_updates_keepalive_and_last_event_id_resumes_from_a_snapshot(
    served: Served,
) -> None:
    view = served.view
    view.change("BTCUSDT", 10.0)
    url = f"{served.base}/stream/sse?channels=bbo&symbols=BTCUSDT"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            retry = await read_event(resp)
            subscribed = await read_event(resp)
            snapshot = await read_event(resp)
            view.change("BTCUSDT", 11.0)
            update = await read_event(resp)
            while update.get("event") != "bbo" or "11.0" not in update["data"]:
                update = await read_event(resp)  # the change before the snapshot, again
            keepalive = await read_event(resp)
        last_id = update["id"]
        view.change("BTCUSDT", 12.0)
        async with session.get(url, headers={"Last-Event-ID": last_id}) as again:
            assert again.status == 200
            await read_event(again)  # retry
            resumed = await read_event(again)
            await read_event(again)  # subscribed
            fresh = await read_event(again)

    assert retry == {"retry": "2000"}
    assert subscribed["event"] == "subscribed"
    assert snapshot["event"] == "bbo"
    snap = orjson.loads(snapshot["data"])
    assert snap["type"] == "snapshot"
    assert snap["data"]["BTCUSDT"]["bid"]["price"] == 10.0
    assert int(update["id"]) > int(snapshot["id"])
    assert orjson.loads(update["data"])["type"] == "update"
    assert keepalive == {"comment": "keepalive"}
    assert "fresh snapshot" in resumed["comment"]
    doc = orjson.loads(fresh["data"])
    assert fresh["event"] == "bbo"
    assert doc["type"] == "snapshot"
    assert doc["data"]["BTCUSDT"]["bid"]["price"] == 12.0
    assert int(fresh["id"]) >= int(last_id)
