"""A Redis that stalls (SIGSTOP: a starved or swapping server) and comes back with its data.

The aggregator's write times out and the cache is marked down; once Redis answers again it
is given what the failed and skipped writes carried, not a refill of everything held, and
then holds exactly what the windows hold. A Redis restarted empty is refilled instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator

import pytest

from marketflow.adapters.redis_cache import RedisPriceCache, open_redis
from marketflow.app.aggregator import Aggregator
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings, RedisSettings
from tests.harness.services import RedisServer
from tests.unit.fakes import FakeStore, RecordingSink

pytestmark = pytest.mark.integration

RETENTION_S = 600


def wall_ms() -> int:
    return int(time.time() * 1000)


def aggregator(cache: RedisPriceCache) -> Aggregator:
    return Aggregator(
        asyncio.Queue(), cache, RecordingSink(FakeStore()), PipelineSettings(), wall_ms,
        rng=random.Random(3),
    )  # fmt: skip


def fold_second(agg: Aggregator, second: int, n: int = 20) -> None:
    """``n`` ticks of three pairs on two exchanges inside ``second``."""
    for ex in ("ex1", "ex2"):
        by_symbol = {
            sym: [(100.0 + i + j, second * 1000 + 37 * i) for i in range(n)]
            for j, sym in enumerate(("A", "B", "C"))
        }
        agg.fold(TickBatch(ex, by_symbol, wall_ms(), 3 * n))


async def cached(cache: RedisPriceCache) -> dict[tuple[str, str, int], tuple[float, ...]]:
    _, seconds = await cache.load(0)
    return {(b.exchange, b.symbol, b.second): tuple(b[3:]) for b in seconds}


def held(agg: Aggregator) -> dict[tuple[str, str, int], tuple[float, ...]]:
    return {
        (b.exchange, b.symbol, b.second): tuple(b[3:])
        for w in agg.all_windows()
        for b in w.all_seconds()
    }


@contextlib.asynccontextmanager
async def flushed_seconds(
    redis: RedisServer, timeout_s: float, seconds: int
) -> AsyncIterator[tuple[RedisPriceCache, Aggregator, int]]:
    """A cache on ``redis``, an aggregator on it that has flushed ``seconds`` seconds of
    ticks, and the next second to fold."""
    cache = await open_redis(RedisSettings(url=redis.url, connect_timeout_s=timeout_s), RETENTION_S)
    agg = aggregator(cache)
    start = wall_ms() // 1000 - 30
    try:
        for s in range(start, start + seconds):
            fold_second(agg, s)
            await agg.flush()
        assert agg.cache_up
        yield cache, agg, start + seconds
    finally:
        await cache.aclose()


async def test_a_stalled_redis_gets_what_it_missed_and_no_refill(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.aggregator")
    async with flushed_seconds(private_redis, 0.3, 10) as (cache, agg, nxt):
        with private_redis.paused():
            for s in range(nxt, nxt + 5):
                fold_second(agg, s)
                fold_second(agg, s - 5)  # seconds written before change again meanwhile
                await agg.flush()  # the first times out; the next ones wait for the backoff
            assert not agg.cache_up
        fold_second(agg, nxt + 5)
        await agg.flush(final=True)  # forced past the backoff
        assert agg.cache_up
        assert await cached(cache) == held(agg)
        assert "cache_down" in caplog.text
        assert "cache_refilled" not in caplog.text


async def test_a_redis_restarted_empty_after_an_outage_is_refilled(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.aggregator")
    async with flushed_seconds(private_redis, 0.5, 5) as (cache, agg, nxt):
        await asyncio.to_thread(private_redis.stop)
        fold_second(agg, nxt)
        await agg.flush()
        assert not agg.cache_up
        await asyncio.to_thread(private_redis.start)  # empty: no persistence, no scripts
        await agg.flush(final=True)  # what was owed; the loss is found with it
        await agg.flush(final=True)  # the refill
        assert await cached(cache) == held(agg)
        assert "cache_refilled kind=redis seconds=36" in caplog.text
