"""GET /stream against the daemon as users run it (PostgreSQL, Redis, a scripted JSON feed):
a WebSocket client on ``ticks`` and ``aggregates`` sees the latest price of each flush and
the minute row once PostgreSQL has it, equal to what the REST API and the table say."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import daemon_config
from tests.e2e.procs import Daemon, assert_real_stack, minute_rows
from tests.e2e.scripted import ScriptedFeed, tick, wall_ms
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

FEED = "scripted"


@pytest.fixture
def stack(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[tuple[ScriptedFeed, Daemon, PostgresServer]]:
    feed = ScriptedFeed()
    feed.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    config["pipeline"] = {**cast(dict[str, object], config["pipeline"]), "stale_after_s": 600.0}
    config["exchanges"] = [{"name": FEED, "host": "127.0.0.1", "port": feed.port}]
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        assert_real_stack(daemon)
        yield feed, daemon, private_postgres
    finally:
        daemon.stop()
        feed.stop()


async def next_update(ws: aiohttp.ClientWebSocketResponse, channel: str) -> dict[str, Any]:
    """The next update of ``channel`` (10 s at most; other frames are skipped)."""
    async with asyncio.timeout(10):
        while True:
            msg: dict[str, Any] = orjson.loads((await ws.receive()).data)
            if msg["type"] == "update" and msg["channel"] == channel:
                return msg


async def test_websocket_client_sees_ticks_then_the_written_minute_row(
    stack: tuple[ScriptedFeed, Daemon, PostgresServer],
) -> None:
    feed, daemon, pg = stack
    minute = (wall_ms() - 180_000) // 60_000 * 60_000  # closed: written at the next sweep
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{daemon.port}/stream") as ws,
    ):
        await ws.send_str('{"op":"subscribe","channels":["ticks","aggregates"],'
                          '"symbols":["BTCUSDT"]}')  # fmt: skip
        first = [orjson.loads((await ws.receive(timeout=10)).data) for _ in range(3)]
        feed.send(b"".join(tick("BTCUSDT", p, minute + 1000 * i)
                           for i, p in enumerate((10.0, 30.0, 20.0))))  # fmt: skip
        ticks = await next_update(ws, "ticks")
        row_update = await next_update(ws, "aggregates")
        now = wall_ms()
        feed.send(tick("BTCUSDT", 42.0, now))
        newest = await next_update(ws, "ticks")
        await ws.send_str('{"op":"subscribe","channels":["nope"]}')
        error = await next_frame(ws)

    assert [(m["type"], m.get("channel")) for m in first] == [
        ("subscribed", None), ("snapshot", "ticks"), ("snapshot", "aggregates"),
    ]  # fmt: skip
    assert ticks["data"]["BTCUSDT"]["prices"][FEED] == {"price": 20.0,
                                                        "timestamp_ms": minute + 2000}  # fmt: skip
    row = row_update["data"]["BTCUSDT"]["rows"][FEED]
    assert (row["minute_ms"], row["low"], row["high"], row["count"]) == (minute, 10.0, 30.0, 3)
    assert row["average"] == pytest.approx(20.0)
    [stored] = await minute_rows(pg.dsn, FEED)
    assert (stored["min_price"], stored["max_price"], stored["tick_count"]) == (10.0, 30.0, 3)
    assert newest["data"]["BTCUSDT"]["prices"][FEED] == {"price": 42.0, "timestamp_ms": now}
    assert newest["seq"] > ticks["seq"]
    assert error["type"] == "error"
    status, body = daemon.get("/health")
    assert status == 200
    assert body["stream"]["bad_messages"] == 1
    assert body["stream"]["frames_sent"] >= 6


async def next_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next frame that is not an update."""
    async with asyncio.timeout(10):
        while True:
            msg: dict[str, Any] = orjson.loads((await ws.receive()).data)
            if msg["type"] != "update":
                return msg
