"""Fault tests on real servers: PostgreSQL and Redis stopped and restarted mid-run."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from marketflow.adapters.postgres.minute_store import open_postgres
from marketflow.adapters.redis_cache import open_redis
from marketflow.adapters.spill_file import JsonlSpillFile
from marketflow.app.minute_writer import MinuteWriter
from marketflow.backoff import Backoff
from marketflow.domain.aggregates import LatestPrice, MinuteRow, SecondBucket
from marketflow.domain.errors import CacheUnavailable, StoreUnavailable
from marketflow.domain.ports import MinuteStore
from marketflow.settings import PostgresSettings, RedisSettings
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.integration

M0 = 1_700_000_040_000


def row(i: int, exchange: str = "exchange1", count: int = 3) -> MinuteRow:
    return MinuteRow(exchange, "BTCUSDT", M0 + i * 60_000, 100.0 + i, 99.0, 101.0 + i, count)


def clock() -> int:
    return 1_700_000_000_000


def writer(store: MinuteStore, spill: Path, max_in_memory: int = 1000) -> MinuteWriter:
    return MinuteWriter(
        store,
        JsonlSpillFile(spill),
        max_in_memory,
        clock,
        retry=Backoff(0.05, 0.2, random.Random(7)),
    )


async def eventually(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def stored_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT exchange, pair_name, (extract(epoch FROM timestamp) * 1000)::bigint AS ms,"
            " average_price, min_price, max_price, tick_count FROM minute_prices"
            " ORDER BY exchange, pair_name, timestamp"
        )
    finally:
        await conn.close()


def as_rows(records: list[asyncpg.Record]) -> list[MinuteRow]:
    return [MinuteRow(*r) for r in records]


async def test_postgres_down_keeps_rows_and_writes_each_once_when_it_returns(
    private_postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = private_postgres.dsn
    store = await open_postgres(PostgresSettings(dsn=dsn, connect_timeout_s=1.0))
    w = writer(store, tmp_path / "spill.jsonl")
    await w.start()
    try:
        w.submit([row(0)])
        await w.flush()

        await asyncio.to_thread(private_postgres.stop)
        w.submit([row(1), row(2, exchange="exchange2")])
        w.submit([row(0, count=8)])  # a late tick changed minute 0 during the outage
        await eventually(lambda: w.status()["state"] == "down")
        st = w.status()
        assert st["pending_rows"] == 3
        assert st["last_error"]
        with pytest.raises(StoreUnavailable):
            await w.flush()

        await asyncio.to_thread(private_postgres.start)
        await w.flush()
        assert w.status()["state"] == "up"
    finally:
        await w.aclose()
        await store.aclose()
    expected = [row(0, count=8), row(1), row(2, exchange="exchange2")]
    assert as_rows(await stored_rows(dsn)) == sorted(expected, key=lambda r: r.key)


async def test_postgres_quick_restart_between_writes_is_not_an_outage(
    private_postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = private_postgres.dsn
    store = await open_postgres(PostgresSettings(dsn=dsn, connect_timeout_s=1.0))
    w = writer(store, tmp_path / "spill.jsonl")
    await w.start()
    try:
        w.submit([row(0)])
        await w.flush()
        await asyncio.to_thread(private_postgres.restart)  # the pooled connection died
        w.submit([row(1)])
        await w.flush()  # the stale connection is replaced, not reported as down
        assert w.status()["state"] == "up"
        assert w.status()["last_error"] is None
    finally:
        await w.aclose()
        await store.aclose()
    assert as_rows(await stored_rows(dsn)) == [row(0), row(1)]


async def test_rows_spilled_at_close_are_written_by_the_next_daemon(
    private_postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = private_postgres.dsn
    spill = tmp_path / "spill" / "minutes.jsonl"
    settings = PostgresSettings(dsn=dsn, connect_timeout_s=1.0)
    store = await open_postgres(settings)
    w = writer(store, spill, max_in_memory=2)
    await w.start()
    await asyncio.to_thread(private_postgres.stop)
    for i in range(5):
        w.submit([row(i)])
    await eventually(lambda: w.status()["spilled_rows"] >= 3)
    await w.aclose()  # the daemon stops while PostgreSQL is still down
    await store.aclose()
    assert w.status()["spilled_rows"] == 5
    assert w.status()["pending_rows"] == 0

    await asyncio.to_thread(private_postgres.start)
    store2 = await open_postgres(settings)
    restarted = writer(store2, spill)
    try:
        await restarted.start()
        await restarted.flush()
        assert restarted.status()["spilled_rows"] == 0
    finally:
        await restarted.aclose()
        await store2.aclose()
    assert as_rows(await stored_rows(dsn)) == [row(i) for i in range(5)]
    assert not await asyncio.to_thread(spill.exists)


async def test_redis_down_raises_cache_unavailable_and_works_after_restart(
    private_redis: RedisServer,
) -> None:
    cache = await open_redis(RedisSettings(url=private_redis.url, connect_timeout_s=1.0), 600)
    p1 = LatestPrice("exchange1", "BTCUSDT", 10.0, 1000, 1001)
    b1 = SecondBucket("exchange1", "BTCUSDT", 1_700_000_040, 1.0, 2.0, 3.0, 2)
    try:
        await cache.write([p1], [b1])
        await asyncio.to_thread(private_redis.stop)
        with pytest.raises(CacheUnavailable):
            await cache.write([p1], [b1])
        with pytest.raises(CacheUnavailable):
            await cache.load(0)
        assert await cache.ping() is False

        await asyncio.to_thread(private_redis.start)  # empty: no persistence, no scripts
        p2 = LatestPrice("exchange1", "BTCUSDT", 11.0, 2000, 2001)
        await cache.write([p2], [b1])
        assert await cache.load(0) == ([p2], [b1])
        assert await cache.ping() is True
    finally:
        await cache.aclose()
