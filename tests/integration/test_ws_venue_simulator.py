"""The WebSocket venue simulator as a client sees it: Binance's combined streams, ``?streams=``
and the SUBSCRIBE family honoured; and ``python -m marketflow.simulator --protocol websocket``
as a user runs it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from marketflow.simulator.ws_venue import WsVenue
from tests.harness.services import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def venue() -> AsyncIterator[WsVenue]:
    async with WsVenue(port=0, rate=1000, seed=2) as v:
        yield v


async def frames(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    """The next ``n`` text frames, decoded (fails after 10 s)."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(out) < n:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            out.append(orjson.loads(msg.data))
    return out


async def until_stream(ws: aiohttp.ClientWebSocketResponse, name: str) -> dict[str, Any]:
    """Skip frames until one of stream ``name`` (fails after 10 s)."""
    async with asyncio.timeout(10):
        while True:
            [frame] = await frames(ws, 1)
            if frame.get("stream") == name:
                return frame


async def test_streams_in_the_url_are_the_only_ones_sent(venue: WsVenue) -> None:
    url = f"http://127.0.0.1:{venue.port}/stream?streams=btcusdt@trade/ethusdt@bookTicker"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        got = await frames(ws, 40)
    assert {f["stream"] for f in got} == {"btcusdt@trade", "ethusdt@bookTicker"}
    for f in got:
        data = f["data"]
        if f["stream"] == "btcusdt@trade":
            assert (data["e"], data["s"]) == ("trade", "BTCUSDT")
            assert isinstance(data["p"], str)
            assert float(data["p"]) > 0
            assert isinstance(data["T"], int)
        else:
            assert data["s"] == "ETHUSDT"
            assert all(isinstance(data[k], str) for k in ("b", "B", "a", "A"))
            assert 0 < float(data["b"]) < float(data["a"])  # a spread around the walk's price


async def test_subscribe_list_and_unsubscribe_as_binance_answers_them(venue: WsVenue) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://127.0.0.1:{venue.port}/stream") as ws,
    ):
        await ws.send_str('{"method":"SUBSCRIBE","params":["solusdt@trade"],"id":7}')
        assert await until_reply(ws) == {"result": None, "id": 7}
        assert (await until_stream(ws, "solusdt@trade"))["data"]["s"] == "SOLUSDT"

        await ws.send_str('{"method":"LIST_SUBSCRIPTIONS","id":8}')
        assert await until_reply(ws) == {"result": ["solusdt@trade"], "id": 8}
        await ws.send_str('{"method":"UNSUBSCRIBE","params":["solusdt@trade"],"id":9}')
        assert await until_reply(ws) == {"result": None, "id": 9}
        await ws.send_str('{"method":"LIST_SUBSCRIPTIONS","id":10}')
        assert await until_reply(ws) == {"result": [], "id": 10}

        await ws.send_str("not json")
        assert await until_reply(ws) == {"code": 2, "msg": "Invalid request", "id": None}
        await ws.send_str('{"method":"SUBSCRIBE","params":"x","id":11}')
        assert (await until_reply(ws))["code"] == 2
    assert venue.subscribes == 1


async def until_reply(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """Skip stream frames until a reply (a frame without ``stream``)."""
    async with asyncio.timeout(10):
        while True:
            [frame] = await frames(ws, 1)
            if "stream" not in frame:
                return frame


def test_simulator_process_serves_websocket_and_stops_on_sigterm() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "marketflow.simulator", "--protocol", "websocket",
            "--port", str(port), "--seed", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def read() -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{port}/stream?streams=dogeusdt@trade/dogeusdt@bookTicker"
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(url) as ws:
                        return await frames(ws, 10)
                except aiohttp.ClientConnectorError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "simulator did not listen"
                    await asyncio.sleep(0.05)

    try:
        got = asyncio.run(read())
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert {f["stream"] for f in got} == {"dogeusdt@trade", "dogeusdt@bookTicker"}
    assert code == 0
