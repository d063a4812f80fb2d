"""The daemon reading a WebSocket venue simulator process (issue 13, WebSocket venues).

The venue's ``--trade-log`` lists every trade frame it sent: the oracle. Every one must be
exactly one tick, across a venue restart (the feed reconnects and subscribes again), and the
minute rows in PostgreSQL must equal the log's minutes.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import orjson
import pytest

from tests.e2e.conftest import PAIRS, daemon_config
from tests.e2e.procs import Daemon, Simulator, assert_real_stack, minute_rows
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

VENUE = "wsvenue"
Trade = tuple[str, float, int]


def read_trade_log(path: Path) -> list[Trade]:
    rows = (orjson.loads(line) for line in path.read_bytes().splitlines())
    return [(r["symbol"], r["price"], r["timestamp"]) for r in rows]


@pytest.mark.timeout(150)
def test_websocket_venue_restart_keeps_every_trade_once_and_minute_rows_match_the_log(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> None:
    trade_log = tmp_path / "trades.jsonl"
    venue = Simulator(tmp_path, VENUE, "websocket", "--trade-log", str(trade_log), "--seed", "5")
    venue.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    config["exchanges"] = [
        {"name": VENUE, "host": "127.0.0.1", "port": venue.port, "protocol": "websocket",
         "ws_subscribe": "message"}
    ]  # fmt: skip
    d = Daemon(tmp_path, config)
    d.start()
    try:
        assert_real_stack(d)
        d.wait_for("/health", lambda s, b: b["exchanges"][VENUE]["ticks"] >= 100, timeout=30)

        venue.stop()
        d.wait_for("/health", lambda s, b: not b["exchanges"][VENUE]["connected"])
        down_ms = time.time() * 1000
        venue.start()
        d.wait_for(
            "/health",
            lambda s, b: (
                b["exchanges"][VENUE]["connected"] and b["exchanges"][VENUE]["reconnects"] >= 1
            ),
        )
        ticks = d.get("/health")[1]["exchanges"][VENUE]["ticks"]
        d.wait_for(
            "/health", lambda s, b: b["exchanges"][VENUE]["ticks"] >= ticks + 100, timeout=30
        )
        venue.stop()  # freeze the oracle: no trade after this

        trades = read_trade_log(trade_log)
        for pair in PAIRS:  # both venue runs sent every pair (re-subscribed after the restart)
            assert any(s == pair and ts < down_ms for s, _, ts in trades), pair
            assert any(s == pair and ts > down_ms for s, _, ts in trades), pair
        status = d.wait_for(
            "/health", lambda s, b: b["exchanges"][VENUE]["ticks"] >= len(trades), timeout=10
        )["exchanges"][VENUE]
        assert status["ticks"] == len(trades)
        assert status["rejected_by_reason"] == {}
        assert status["protocol"] == "websocket"

        # Shutdown writes the partial minute: every minute row equals the log's minute.
        d.terminate()
    finally:
        d.stop()
        venue.stop()
    rows = asyncio.run(minute_rows(private_postgres.dsn, VENUE))
    expected: dict[tuple[str, int], list[float]] = {}
    for sym, price, ts in trades:
        expected.setdefault((sym, ts // 60_000 * 60_000), []).append(price)
    got = {(r["pair_name"], r["minute_ms"]): r for r in rows}
    assert set(got) == set(expected)
    for key, prices in expected.items():
        r = got[key]
        assert r["tick_count"] == len(prices), (key, dict(r))
        assert r["min_price"] == min(prices), (key, dict(r))
        assert r["max_price"] == max(prices), (key, dict(r))
        assert math.isclose(r["average_price"], sum(prices) / len(prices), rel_tol=1e-12)
