"""The daemon as users run it: real simulator processes, PostgreSQL and Redis, over HTTP."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.e2e.conftest import PAIRS, Stack
from tests.e2e.procs import minute_rows

pytestmark = pytest.mark.e2e

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def has_price(status: int, body: Any) -> bool:
    return status == 200 and body["price"] > 0


def wait_minute_boundary_passed(grace_s: float = 3.5) -> int:
    """Sleep past the next minute boundary plus the close grace; return that minute's start."""
    now = time.time()
    boundary = (int(now) // 60 + 1) * 60
    time.sleep(boundary - now + grace_s)
    return (boundary - 60) * 1000


def test_every_endpoint_answers_from_three_simulators(stack: Stack) -> None:
    d = stack.daemon
    body = d.wait_for("/prices/latest/BTCUSDT", has_price)
    assert body["exchange"] == "all"
    assert RFC3339.match(body["timestamp"])
    for sim in stack.sims:
        for pair in PAIRS:
            b = d.wait_for(f"/prices/latest/{sim.name}/{pair}", has_price)
            assert b["symbol"] == pair
            assert b["exchange"] == sim.name
    time.sleep(1.2)
    for stat in ("highest", "lowest", "average"):
        for path in (f"/prices/{stat}/ETHUSDT", f"/prices/{stat}/exchange2/ETHUSDT"):
            for q in ("", "?period=1s", "?period=5s", "?period=1m", "?period=5m"):
                status, b = d.get(path + q)
                assert status == 200, (path + q, b)
                assert b["price"] > 0
                assert b["period"] == (q.split("=")[1] if q else "all")
                if stat == "average":
                    assert b["count"] > 0
    _, hi = d.get("/prices/highest/ETHUSDT?period=1m")
    _, lo = d.get("/prices/lowest/ETHUSDT?period=1m")
    _, avg = d.get("/prices/average/ETHUSDT?period=1m")
    assert lo["price"] <= avg["price"] <= hi["price"]
    assert d.get("/prices/latest/XRPUSDT")[0] == 404
    assert d.get("/prices/latest/exchange9/BTCUSDT")[0] == 404
    status, b = d.get("/prices/average/BTCUSDT?period=banana")
    assert status == 400
    assert "error" in b
    health = d.wait_for(
        "/health", lambda s, b: all(e["connected"] for e in b["exchanges"].values())
    )
    assert health["mode"] == "live"
    assert set(health["exchanges"]) == {"exchange1", "exchange2", "exchange3"}
    assert health["postgres"]["kind"] == "postgres"
    assert health["postgres"]["state"] == "up"
    assert health["redis"]["state"] == "up"
    assert health["status"] == "ok"

    assert d.request("POST", "/mode/test") == (200, {"mode": "test"})
    b = d.wait_for("/prices/latest/BTCUSDT", lambda s, b: s == 200 and "test-" in b["source"])
    assert d.get("/mode") == (200, {"mode": "test"})
    assert d.request("POST", "/mode/live") == (200, {"mode": "live"})
    d.wait_for("/prices/latest/BTCUSDT", lambda s, b: s == 200 and "test-" not in b["source"])

    assert d.stop(signal.SIGTERM) == 0
    rows = asyncio.run(minute_rows(stack.postgres.dsn))
    # The partial minute was written at shutdown, for every live exchange and pair.
    live = {(r["exchange"], r["pair_name"]) for r in rows if not r["exchange"].startswith("test-")}
    assert live == {(s.name, p) for s in stack.sims for p in PAIRS}
    for r in rows:
        assert r["min_price"] <= r["average_price"] <= r["max_price"]
        assert r["timestamp"].second == 0
    assert "stopped" in d.log()


def test_simulator_restart_is_reconnected_while_others_flow(stack: Stack) -> None:
    d = stack.daemon
    d.wait_for("/health", lambda s, b: all(e["connected"] for e in b["exchanges"].values()))
    d.wait_for("/prices/latest/exchange2/BTCUSDT", has_price)
    stack.sims[0].stop()
    health = d.wait_for("/health", lambda s, b: not b["exchanges"]["exchange1"]["connected"])
    assert health["status"] == "degraded"
    _, before = d.get("/prices/latest/exchange2/BTCUSDT")
    time.sleep(1.0)
    _, after = d.get("/prices/latest/exchange2/BTCUSDT")
    assert after["timestamp"] > before["timestamp"]  # the others keep flowing
    stack.sims[0].start()
    health = d.wait_for(
        "/health",
        lambda s, b: (
            b["exchanges"]["exchange1"]["connected"]
            and b["exchanges"]["exchange1"]["reconnects"] >= 1
        ),
    )
    _, b1 = d.get("/prices/latest/exchange1/BTCUSDT")
    time.sleep(0.6)
    _, b2 = d.get("/prices/latest/exchange1/BTCUSDT")
    assert b2["timestamp"] > b1["timestamp"]


@pytest.mark.timeout(240)  # waits for a minute to close
def test_redis_down_rows_still_reach_postgres_and_api_answers(stack: Stack) -> None:
    d = stack.daemon
    d.wait_for("/prices/latest/BTCUSDT", has_price)
    stack.redis.stop()
    d.wait_for("/health", lambda s, b: b["redis"]["state"] == "down")
    minute = wait_minute_boundary_passed()
    status, body = d.get("/prices/latest/exchange1/SOLUSDT")
    assert status == 200
    assert time.time() * 1000 - _ms(body["timestamp"]) < 2000
    assert d.get("/prices/average/SOLUSDT?period=1m")[0] == 200
    rows = asyncio.run(minute_rows(stack.postgres.dsn))
    assert {(r["exchange"], r["pair_name"]) for r in rows if _ts(r) == minute} == {
        (s.name, p) for s in stack.sims for p in PAIRS
    }
    stack.redis.start()
    d.wait_for("/health", lambda s, b: b["redis"]["state"] == "up", timeout=30)

    async def latest_in_redis() -> dict[bytes | str, bytes | str]:
        client = aioredis.Redis.from_url(stack.redis.url)
        try:
            return await client.hgetall("marketflow:latest")
        finally:
            await client.aclose()

    assert len(asyncio.run(latest_in_redis())) == 15  # refilled: 3 exchanges x 5 pairs


@pytest.mark.timeout(300)  # waits for two minute boundaries
def test_postgres_down_no_minute_row_lost_after_it_returns(stack: Stack) -> None:
    d = stack.daemon
    d.wait_for("/prices/latest/BTCUSDT", has_price)
    wait_minute_boundary_passed(grace_s=0.5)
    stack.postgres.stop()
    # The previous minute closes ~2 s after the boundary: its write fails, rows are kept.
    d.wait_for("/health", lambda s, b: b["postgres"]["state"] == "down", timeout=75)
    whole = wait_minute_boundary_passed()  # a minute ingested entirely while it was down
    assert d.get("/prices/average/exchange1/BTCUSDT?period=1m")[0] == 200  # answers meanwhile
    stack.postgres.start()
    d.wait_for(
        "/health",
        lambda s, b: b["postgres"]["state"] == "up" and b["postgres"]["pending_rows"] == 0,
        timeout=40,
    )
    rows = [r for r in asyncio.run(minute_rows(stack.postgres.dsn)) if _ts(r) == whole]
    # Every exchange x pair once, with every tick: 10 per second per pair per simulator.
    assert len(rows) == 15
    assert len({(r["exchange"], r["pair_name"]) for r in rows}) == 15
    for r in rows:
        assert 590 <= r["tick_count"] <= 610, dict(r)


def _ms(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000


def _ts(r: asyncpg.Record) -> int:
    return int(r["timestamp"].timestamp() * 1000)
