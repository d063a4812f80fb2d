"""The daemon as users run it: real simulator processes, PostgreSQL and Redis, over HTTP."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.e2e.conftest import PAIRS, Stack, daemon_config
from tests.e2e.procs import (
    Daemon,
    assert_real_stack,
    feed_time_ms,
    minute_rows,
    poll,
    wait_feed_time,
)
from tests.e2e.scripted import ScriptedFeed, tick
from tests.harness.services import PostgresServer, RedisServer

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
    # The running daemon measures its own loop and its collector (the raised threshold).
    assert health["loop_lag"]["beats"] > 0
    assert health["gc"]["threshold"][0] == 50_000

    assert d.request("POST", "/mode/test") == (200, {"mode": "test"})
    b = d.wait_for("/prices/latest/BTCUSDT", lambda s, b: s == 200 and "test-" in b["source"])
    assert d.get("/mode") == (200, {"mode": "test"})
    assert d.request("POST", "/mode/live") == (200, {"mode": "live"})
    d.wait_for("/prices/latest/BTCUSDT", lambda s, b: s == 200 and "test-" not in b["source"])

    d.terminate()
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


# -- exact answers on scripted exchanges --------------------------------------------------------

SYMBOL = "ETHUSDT"
# (seconds relative to the base second B, ms into that second, price). B is a few seconds
# ahead of the start; every second from B - 310 to B + 39 (40 s ahead of receipt, under the
# 60 s the daemon believes) holds ticks, so whichever second the queries run in, every period
# boundary falls between two seconds with ticks: one second too many or too few changes the
# count. exchange1 falls with time, so its highest is its oldest second in the period;
# exchange2 rises, so its lowest is its oldest second in the period.
SCRIPT: dict[str, list[tuple[int, int, float]]] = {
    "exchange1": [
        (-400, 120, 3000.5),  # beyond 5m: only in the all-history answers
        *[(rel, 250, 5000.0 - 0.5 * rel) for rel in range(-310, 40)],
    ],
    "exchange2": [
        *[(rel, 600, 1000.0 + 0.5 * (rel + 310)) for rel in range(-310, 40)],
        *[(rel, 700, 1100.0 + 0.125 * rel) for rel in range(0, 40, 3)],  # two ticks a second
        (-100, 10, 9000.0),  # the highest of 5m, seen in two seconds: the newer one is the
        (-30, 900, 9000.0),  # answer's timestamp
    ],
}
# Stored minutes older than the 10-minute window (exchange, minutes before B's minute, avg, lo,
# hi, count); two lows of 700 in different minutes: the newer minute is the answer.
STORED = [
    ("exchange1", 30, 5001.0, 4800.0, 9500.0, 4),
    ("exchange2", 40, 900.5, 700.0, 1000.0, 2),
    ("exchange2", 90, 800.0, 700.0, 900.0, 1),
]


@dataclass(frozen=True)
class Part:
    """What the daemon may merge: one tick (at its second) or one stored minute."""

    exchange: str
    second: int  # the second it is in (a stored minute: its first second)
    stamp_ms: int  # the timestamp highest/lowest carry: the second's or the minute's start
    low: float
    high: float
    total: float
    count: int
    stored: bool


def script_parts(base_s: int) -> list[Part]:
    parts = [
        Part(ex, base_s + rel, (base_s + rel) * 1000, p, p, p, 1, False)
        for ex, ticks in SCRIPT.items()
        for rel, _, p in ticks
    ]
    minute = base_s // 60 * 60_000
    for ex, ago, avg, lo, hi, n in STORED:
        m = minute - ago * 60_000
        parts.append(Part(ex, m // 1000, m, lo, hi, avg * n, n, True))
    return parts


def expected(
    parts: list[Part], stat: str, exchange: str | None, period_s: int | None, now_s: int
) -> tuple[float, int, int] | None:
    """(price, count, timestamp ms or -1 for "the time of the answer"), None for 404, per the
    README: a period of N s is the seconds now - N + 1 .. now; none means all stored history;
    highest/lowest carry the newest second (or stored minute) holding that price."""
    chosen = [
        p
        for p in parts
        if (exchange is None or p.exchange == exchange)
        and (period_s is None or (not p.stored and now_s - period_s < p.second <= now_s))
    ]
    if not chosen:
        return None
    count = sum(p.count for p in chosen)
    if stat == "average":
        return math.fsum(p.total for p in chosen) / count, count, -1
    pick = max if stat == "highest" else min
    price = pick(p.high if stat == "highest" else p.low for p in chosen)
    newest = max(p.stamp_ms for p in chosen if (p.high if stat == "highest" else p.low) == price)
    return price, count, newest


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def insert_stored(dsn: str, base_s: int) -> None:
    minute = base_s // 60 * 60_000
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO minute_prices (pair_name, exchange, timestamp, average_price, "
            "min_price, max_price, tick_count) VALUES ($1, $2, to_timestamp($3 / 1000.0), "
            "$4, $5, $6, $7)",
            [
                (SYMBOL, ex, minute - ago * 60_000, avg, lo, hi, n)
                for ex, ago, avg, lo, hi, n in STORED
            ],
        )
    finally:
        await conn.close()


@pytest.fixture
def scripted_pair(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[tuple[Daemon, dict[str, ScriptedFeed], PostgresServer]]:
    feeds = {name: ScriptedFeed() for name in SCRIPT}
    for f in feeds.values():
        f.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    config["pipeline"] = {**cast(dict[str, object], config["pipeline"]), "stale_after_s": 600.0}
    config["exchanges"] = [
        {"name": name, "host": "127.0.0.1", "port": f.port} for name, f in feeds.items()
    ]
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        yield daemon, feeds, private_postgres
    finally:
        daemon.stop()
        for f in feeds.values():
            f.stop()


def test_every_stat_and_period_is_exact_on_scripted_exchanges(
    scripted_pair: tuple[Daemon, dict[str, ScriptedFeed], PostgresServer],
) -> None:
    """highest/lowest/average x all/exchange2 x no period, 1s, 5s, 1m, 5m: 30 answers, each the
    exact price, count and timestamp the README rules give for the ticks and rows sent."""
    d, feeds, pg = scripted_pair
    assert_real_stack(d)
    base_s = int(time.time()) + 2
    asyncio.run(insert_stored(pg.dsn, base_s))
    for name, ticks in SCRIPT.items():
        feeds[name].send(
            b"".join(tick(SYMBOL, p, (base_s + rel) * 1000 + ms) for rel, ms, p in ticks)
        )
    health = d.wait_for(
        "/health",
        lambda s, b: all(b["exchanges"][n]["ticks"] == len(t) for n, t in SCRIPT.items()),
    )
    assert health["late_ticks"] == 0
    assert all(e["rejected"] == 0 for e in health["exchanges"].values()), health
    parts = script_parts(base_s)

    # Latest: the newest exchange timestamp, per exchange and across them (with its source).
    newest = {n: max(t, key=lambda x: (x[0], x[1])) for n, t in SCRIPT.items()}
    for name, (rel, ms, p) in newest.items():
        _, b = d.get(f"/prices/latest/{name}/{SYMBOL}")
        assert (b["price"], b["timestamp"]) == (p, iso((base_s + rel) * 1000 + ms))
    _, b = d.get(f"/prices/latest/{SYMBOL}")
    rel, ms, p = newest["exchange2"]  # 39 s + 700 ms > exchange1's 39 s + 250 ms
    assert (b["price"], b["timestamp"], b["source"]) == (
        p, iso((base_s + rel) * 1000 + ms), "exchange2",
    )  # fmt: skip

    poll(time.time, lambda t: t >= base_s, 10, "the clock reaches the scripted seconds")
    answered_1s = 0
    for stat in ("highest", "lowest", "average"):
        for exchange in (None, "exchange2"):
            path = f"/prices/{stat}/{exchange + '/' if exchange else ''}{SYMBOL}"
            for label, period_s in (("all", None), ("1s", 1), ("5s", 5), ("1m", 60), ("5m", 300)):
                q = "" if period_s is None else f"?period={label}"
                for _ in range(20):  # the answer's second must be known: before == after
                    before = time.time()
                    status, body = d.get(path + q)
                    after = time.time()
                    if int(before) == int(after):
                        break
                else:
                    raise AssertionError(f"{path}{q}: no answer within one clock second")
                want = expected(parts, stat, exchange, period_s, int(before))
                where = f"{path}{q} at second {int(before) - base_s:+d} of the script"
                if want is None:
                    assert status == 404, (where, body)
                    continue
                assert status == 200, (where, body)
                price, count, ts = want
                answered_1s += period_s == 1
                assert (body["symbol"], body["exchange"], body["period"]) == (
                    SYMBOL, exchange or "all", label,
                ), where  # fmt: skip
                assert body["count"] == count if "count" in body else stat != "average", where
                if stat == "average":
                    assert body["price"] == pytest.approx(price, rel=1e-12), where
                    assert iso(int(before * 1000) - 1) <= body["timestamp"], where
                    assert body["timestamp"] <= iso(int(after * 1000) + 1), where
                else:
                    assert (body["price"], body["timestamp"]) == (price, iso(ts)), where
    assert answered_1s == 6, "the 1s answers fell outside the scripted seconds"
