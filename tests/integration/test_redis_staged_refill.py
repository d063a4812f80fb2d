"""A big write (the refill after an outage) goes to staging keys in chunks, then one script
publishes them with the latest prices and the marks: real Redis (harness server)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

import marketflow.adapters.redis_cache as redis_cache
from marketflow.adapters.redis_cache import STAGING_PREFIX, RedisPriceCache, open_redis
from marketflow.domain.aggregates import LatestPrice, SecondBucket
from marketflow.domain.errors import CacheUnavailable
from marketflow.settings import RedisSettings

pytestmark = pytest.mark.integration

RETENTION_S = 600
S0 = 1_700_000_040  # a minute start (epoch seconds)
MARKS = {"exchange1": (41, 1_700_000_200_000), "exchange2": (7, 1_700_000_200_000)}


def state() -> tuple[list[LatestPrice], list[SecondBucket]]:
    """Two pairs on two exchanges over three minutes; one minute's seconds out of order."""
    latest, seconds = [], []
    for ex in ("exchange1", "exchange2"):
        for sym in ("BTCUSDT", "ETHUSDT"):
            latest.append(LatestPrice(ex, sym, 0.1 + 0.2, (S0 + 170) * 1000, (S0 + 170) * 1000))
            for s in [*range(S0, S0 + 150, 7), S0 + 3, S0 + 171]:
                low = s % 97 + 0.5
                seconds.append(SecondBucket(ex, sym, s, low, low + 2, low * 3 + 1.25, 3))
    return latest, seconds


async def dump(client: aioredis.Redis) -> dict[str, Any]:
    """Every key's value, and whether it expires (staging keys apart)."""
    out: dict[str, Any] = {}
    async for key in client.scan_iter(match="marketflow:*"):
        kind = await client.type(key)
        value = await client.hgetall(key) if kind == "hash" else await client.get(key)
        out[key] = (value, await client.ttl(key) > 0)
    return out


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[RedisPriceCache]:
    async with await open_redis(RedisSettings(url=redis_url), RETENTION_S) as opened:
        yield opened


@pytest.fixture
def small_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_cache, "STAGE_ABOVE_SECONDS", 10)
    monkeypatch.setattr(redis_cache, "STAGE_CHUNK_SECONDS", 9)  # minutes span chunks


async def test_a_staged_write_leaves_what_one_script_leaves_and_no_staging_key(
    cache: RedisPriceCache, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    latest, seconds = state()
    assert len(seconds) > 10 * 9
    assert await cache.write(latest, seconds, MARKS, whole=True)  # the sentinel was missing
    whole = await dump(client)
    await client.flushall()
    monkeypatch.setattr(redis_cache, "STAGE_ABOVE_SECONDS", 10)
    monkeypatch.setattr(redis_cache, "STAGE_CHUNK_SECONDS", 9)
    assert await cache.write(latest, seconds, MARKS, whole=True)
    staged = await dump(client)
    assert staged == whole
    assert not [k for k in staged if k.startswith(STAGING_PREFIX)]
    assert len([k for k in staged if k.startswith("marketflow:window:")]) == 2 * 2 * 3


async def test_a_refill_cut_short_publishes_nothing_and_its_staging_keys_expire(
    cache: RedisPriceCache,
    client: aioredis.Redis,
    small_stages: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon dies (here: the publish fails) after the chunks: the minute keys, latest
    prices and marks are as before, so a restart resumes from marks that match the seconds."""
    await client.hset("marketflow:marks", mapping={"exchange1": "3,1700000000000"})
    before = await dump(client)
    run = RedisPriceCache._run

    async def dies_at_publish(self: RedisPriceCache, keys: list[str], argv: Sequence[Any]) -> Any:
        if argv[3] != "-1":
            raise CacheUnavailable("redis: the daemon died here")
        return await run(self, keys, argv)

    monkeypatch.setattr(RedisPriceCache, "_run", dies_at_publish)
    latest, seconds = state()
    with pytest.raises(CacheUnavailable):
        await cache.write(latest, seconds, MARKS, whole=True)
    after = await dump(client)
    left = {k: v for k, v in after.items() if not k.startswith(STAGING_PREFIX)}
    assert left == before
    staging = [k for k in after if k.startswith(STAGING_PREFIX)]
    assert len(staging) == 2 * 2 * 3
    for key in staging:
        assert 0 < await client.ttl(key) <= RETENTION_S + redis_cache.EXPIRY_MARGIN_S


async def test_a_publish_that_finds_a_staging_key_gone_writes_nothing(
    cache: RedisPriceCache,
    client: aioredis.Redis,
    small_stages: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis restarted between the chunks and the publish (or the refill outlived a
    staging key): nothing is published, and the write fails, so the daemon refills again."""
    run = RedisPriceCache._run

    async def loses_one(self: RedisPriceCache, keys: list[str], argv: Sequence[Any]) -> Any:
        if argv[3] != "-1":
            await client.delete(keys[-2])  # the last pair's staging key
        return await run(self, keys, argv)

    monkeypatch.setattr(RedisPriceCache, "_run", loses_one)
    latest, seconds = state()
    with pytest.raises(CacheUnavailable, match="staging"):
        await cache.write(latest, seconds, MARKS, whole=True)
    after = await dump(client)
    assert not [k for k in after if k.startswith("marketflow:window:")]
    assert "marketflow:marks" not in after
    assert "marketflow:latest" not in after
    assert "marketflow:alive" not in after


async def test_a_big_write_of_changed_seconds_is_staged_and_keeps_the_minutes_others(
    cache: RedisPriceCache,
    client: aioredis.Redis,
    small_stages: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backfill's flush (changed seconds alone, more than the threshold) is staged too,
    each staging key starting as a copy of its minute key: the minute's other seconds
    stay, and no script carries more than a chunk."""
    latest, seconds = state()
    early = [b for b in seconds if b.second < S0 + 60]
    later = [b for b in seconds if b.second >= S0 + 60]
    await cache.write(latest, early)
    scripts: list[int] = []
    run = RedisPriceCache._run

    async def counted(self: RedisPriceCache, keys: list[str], argv: Sequence[Any]) -> Any:
        if len(argv) > 3 and argv[3] == "-1":
            scripts.append(len(orjson.loads(argv[2])))
        return await run(self, keys, argv)

    monkeypatch.setattr(RedisPriceCache, "_run", counted)
    evens = [b for b in later if b.second % 2 == 0]
    odds = [b for b in later if b.second % 2 == 1]
    assert min(len(evens), len(odds)) > 10  # both over the threshold
    await cache.write(latest, evens, MARKS)
    await cache.write(latest, odds, MARKS)
    assert len(scripts) >= 2 * 2  # staged,
    assert max(scripts) <= 9  # a chunk per script
    _, loaded = await cache.load(0)
    assert sorted(loaded) == sorted(seconds)
    assert await cache.load_marks() == MARKS
    assert not [k async for k in client.scan_iter(match=f"{STAGING_PREFIX}*")]
    for key in [k async for k in client.scan_iter(match="marketflow:window:*")]:
        assert 0 < await client.ttl(key) <= RETENTION_S + redis_cache.EXPIRY_MARGIN_S


async def test_a_staged_write_of_changed_seconds_cut_short_changes_no_minute(
    cache: RedisPriceCache,
    client: aioredis.Redis,
    small_stages: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Copied and changed in staging, then the daemon dies before the publish: the minute
    keys and the marks are as the last whole write left them."""
    latest, seconds = state()
    await cache.write(latest, seconds, MARKS)
    before = await dump(client)
    run = RedisPriceCache._run

    async def dies_at_publish(self: RedisPriceCache, keys: list[str], argv: Sequence[Any]) -> Any:
        if argv[3] != "-1":
            raise CacheUnavailable("redis: the daemon died here")
        return await run(self, keys, argv)

    monkeypatch.setattr(RedisPriceCache, "_run", dies_at_publish)
    changed = [b._replace(count=b.count + 1, total=b.total + 1.0) for b in seconds]
    with pytest.raises(CacheUnavailable):
        await cache.write(latest, changed, {"exchange1": (99, 1_700_000_300_000)})
    after = await dump(client)
    assert {k: v for k, v in after.items() if not k.startswith(STAGING_PREFIX)} == before
    assert [k for k in after if k.startswith(STAGING_PREFIX)]
