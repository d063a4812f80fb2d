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
from tests.e2e.procs import assert_real_stack, feed_time_ms, minute_rows, poll, wait_feed_time

pytestmark = pytest.mark.e2e

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def has_price(status: int, body: Any) -> bool:
    return status == 200 and body["price"] > 0


def rows_of_minute(dsn: str, minute_ms: int) -> list[asyncpg.Record]:
    return [r for r in asyncio.run(minute_rows(dsn)) if _ts(r) == minute_ms]


def wait_newer(d: Any, path: str, than: Any) -> Any:
    """Poll ``path`` until it serves a tick newer than ``than`` (a previous body)."""
    return d.wait_for(path, lambda s, b: s == 200 and feed_time_ms(b) > feed_time_ms(than))


def test_every_endpoint_answers_from_three_simulators(stack: Stack) -> None:
    d = stack.daemon
    assert_real_stack(d)
    body = d.wait_for("/prices/latest/BTCUSDT", has_price)
    assert body["exchange"] == "all"
    assert RFC3339.match(body["timestamp"])
    for sim in stack.sims:
        for pair in PAIRS:
            b = d.wait_for(f"/prices/latest/{sim.name}/{pair}", has_price)
            assert b["symbol"] == pair
            assert b["exchange"] == sim.name
    for stat in ("highest", "lowest", "average"):
        for path in (f"/prices/{stat}/ETHUSDT", f"/prices/{stat}/exchange2/ETHUSDT"):
            for q in ("", "?period=1s", "?period=5s", "?period=1m", "?period=5m"):
                b = d.wait_for(path + q, lambda s, b: s == 200)
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
    assert (health["redis"]["kind"], health["redis"]["state"]) == ("redis", "up")
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
    assert_real_stack(d)
    d.wait_for("/health", lambda s, b: all(e["connected"] for e in b["exchanges"].values()))
    d.wait_for("/prices/latest/exchange2/BTCUSDT", has_price)
    stack.sims[0].stop()
    health = d.wait_for("/health", lambda s, b: not b["exchanges"]["exchange1"]["connected"])
    assert health["status"] == "degraded"
    _, before = d.get("/prices/latest/exchange2/BTCUSDT")
    before = wait_newer(d, "/prices/latest/exchange2/BTCUSDT", before)  # the others flow
    _, gone = d.get("/prices/latest/exchange1/BTCUSDT")
    wait_newer(d, "/prices/latest/exchange2/BTCUSDT", before)
    assert d.get("/prices/latest/exchange1/BTCUSDT")[1] == gone  # and exchange1 does not
    stack.sims[0].start()
    health = d.wait_for(
        "/health",
        lambda s, b: (
            b["exchanges"]["exchange1"]["connected"]
            and b["exchanges"]["exchange1"]["reconnects"] >= 1
        ),
    )
    _, b1 = d.get("/prices/latest/exchange1/BTCUSDT")
    wait_newer(d, "/prices/latest/exchange1/BTCUSDT", b1)


@pytest.mark.timeout(240)  # waits for a minute to close
def test_redis_down_rows_still_reach_postgres_and_api_answers(stack: Stack) -> None:
    d = stack.daemon
    assert_real_stack(d)
    d.wait_for("/prices/latest/BTCUSDT", has_price)
    stack.redis.stop()
    health = d.wait_for("/health", lambda s, b: b["redis"]["state"] == "down")
    assert health["status"] == "degraded"
    down_ms = time.time() * 1000
    minute = int(down_ms) // 60_000 * 60_000  # closes while Redis is down
    # Served from memory meanwhile: a tick received after Redis went down.
    d.wait_for(
        "/prices/latest/exchange1/SOLUSDT",
        lambda s, b: s == 200 and feed_time_ms(b) > down_ms,
    )
    assert d.get("/prices/average/SOLUSDT?period=1m")[0] == 200
    everyone = {(s.name, p) for s in stack.sims for p in PAIRS}
    poll(
        lambda: {
            (r["exchange"], r["pair_name"]) for r in rows_of_minute(stack.postgres.dsn, minute)
        },
        lambda got: got == everyone,
        minute / 1000 + 90 - time.time(),
        "the minute that closed while Redis was down in PostgreSQL",
    )
    stack.redis.start()
    health = d.wait_for("/health", lambda s, b: b["redis"]["state"] == "up", timeout=30)
    assert health["redis"]["kind"] == "redis"
    d.wait_for("/health", lambda s, b: b["status"] == "ok")  # no longer degraded

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
    assert_real_stack(d)
    d.wait_for("/prices/latest/BTCUSDT", has_price)
    if time.time() % 60 < 6:  # let the previous minute close (grace) before the stop
        wait_feed_time(d, int(time.time()) // 60 * 60 + 6)
    stopped_s = time.time()
    stack.postgres.stop()
    # The minute open now closes at its end + grace: its write fails, its rows are kept.
    d.wait_for("/health", lambda s, b: b["postgres"]["state"] == "down", timeout=90)
    whole = (int(stopped_s) // 60 + 1) * 60  # a minute ingested entirely while it was down
    wait_feed_time(d, whole + 60)
    # Both minutes closed, their 2 x 15 rows wait for PostgreSQL (the open one is not a row):
    # in memory, or after 30 s of outage in the spill file (before Redis would expire them).
    d.wait_for(
        "/health",
        lambda s, b: b["postgres"]["pending_rows"] + b["postgres"]["spilled_rows"] == 30,
        timeout=30,
    )
    whole *= 1000
    assert d.get("/prices/average/exchange1/BTCUSDT?period=1m")[0] == 200  # answers meanwhile
    stack.postgres.start()
    d.wait_for(
        "/health",
        lambda s, b: (
            b["postgres"]["state"] == "up"
            and b["postgres"]["pending_rows"] == 0
            and b["postgres"]["spilled_rows"] == 0
        ),
        timeout=40,
    )
    rows = rows_of_minute(stack.postgres.dsn, whole)
    # Every exchange x pair once, with every tick: 10 per second per pair per simulator.
    assert len(rows) == 15
    assert len({(r["exchange"], r["pair_name"]) for r in rows}) == 15
    for r in rows:
        assert 590 <= r["tick_count"] <= 610, dict(r)


def _ts(r: asyncpg.Record) -> int:
    return int(r["timestamp"].timestamp() * 1000)
