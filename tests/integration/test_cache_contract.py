"""One contract for both price caches: real Redis (harness server) and in-process memory."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.asyncio.connection import Connection

from marketflow.adapters.memory_cache import MemoryPriceCache
from marketflow.adapters.redis_cache import RedisPriceCache, open_redis
from marketflow.domain.aggregates import LatestPrice, SecondBucket
from marketflow.domain.errors import CacheUnavailable
from marketflow.settings import RedisSettings
from tests.harness.services import RedisServer, free_port

pytestmark = pytest.mark.integration

Cache = RedisPriceCache | MemoryPriceCache
RETENTION_S = 600
S0 = 1_700_000_040  # a minute start (epoch seconds)


def latest(price: float, ts: int, exchange: str = "exchange1") -> LatestPrice:
    return LatestPrice(exchange, "BTCUSDT", price, ts, ts + 5)


def second(sec: int, low: float = 1.0, count: int = 2, exchange: str = "exchange1") -> SecondBucket:
    return SecondBucket(exchange, "BTCUSDT", sec, low, low + 1.5, low * count + 0.25, count)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_cache(redis_url: str) -> AsyncIterator[RedisPriceCache]:
    async with await open_redis(RedisSettings(url=redis_url), RETENTION_S) as opened:
        yield opened


@pytest.fixture
async def memory_cache() -> AsyncIterator[MemoryPriceCache]:
    async with MemoryPriceCache(RETENTION_S) as opened:
        yield opened


@pytest.fixture(params=["redis_cache", "memory_cache"])
def cache(request: pytest.FixtureRequest) -> Cache:
    """Each contract test runs once per cache."""
    opened: Cache = request.getfixturevalue(request.param)
    return opened


async def test_newest_exchange_timestamp_wins_whatever_the_write_order(cache: Cache) -> None:
    await cache.write([latest(10.0, 2000)], [])
    await cache.write([latest(9.0, 1000)], [])  # older tick arriving late: ignored
    await cache.write([latest(11.0, 3000, exchange="exchange2")], [])
    got, _ = await cache.load(0)
    assert sorted(got, key=lambda p: p.exchange) == [
        latest(10.0, 2000),
        latest(11.0, 3000, exchange="exchange2"),
    ]


async def test_newer_latest_price_replaces_older(cache: Cache) -> None:
    await cache.write([latest(10.0, 2000)], [])
    await cache.write([latest(12.5, 2001)], [])
    got, _ = await cache.load(0)
    assert got == [latest(12.5, 2001)]


async def test_second_is_overwritten_whole_not_added(cache: Cache) -> None:
    await cache.write([], [second(S0 + 1, low=1.0, count=2)])
    await cache.write([], [second(S0 + 1, low=0.5, count=5)])
    _, seconds = await cache.load(S0)
    assert seconds == [second(S0 + 1, low=0.5, count=5)]


async def test_load_returns_seconds_at_or_after_since_across_minutes(cache: Cache) -> None:
    buckets = [second(S0 - 1), second(S0), second(S0 + 59), second(S0 + 60)]
    buckets.append(second(S0 + 30, exchange="exchange2"))
    await cache.write([latest(1.0, 1)], buckets)
    _, seconds = await cache.load(S0)
    assert sorted(seconds, key=lambda b: (b.exchange, b.second)) == [
        second(S0),
        second(S0 + 59),
        second(S0 + 60),
        second(S0 + 30, exchange="exchange2"),
    ]
    _, everything = await cache.load(0)
    assert len(everything) == 5


async def test_float_values_round_trip_exactly(cache: Cache) -> None:
    b = SecondBucket("exchange1", "ETHUSDT", S0, 0.1 + 0.2, 1 / 3, 12345.678901234567, 7)
    p = LatestPrice("exchange1", "ETHUSDT", 0.1 + 0.2, 1_700_000_000_123, 1_700_000_000_456)
    await cache.write([p], [b])
    assert await cache.load(S0) == ([p], [b])


async def test_floats_of_any_magnitude_round_trip_exactly(cache: Cache) -> None:
    # The seconds' values are encoded by orjson (1e+16, 0.00001), not by repr (1e16, 1e-05).
    values = [(1e-5, 2.5e-7, 1e16 + 2.0), (123456789.12345679, 9e15, 5e-324 + 1e-300)]
    seconds = [
        SecondBucket("exchange1", "ETHUSDT", S0 + i, low, high, total, i + 1)
        for i, (low, high, total) in enumerate(values)
    ]
    await cache.write([], seconds)
    assert (await cache.load(S0))[1] == seconds


async def test_closed_cache_raises_cache_unavailable_and_closes_twice(cache: Cache) -> None:
    await cache.aclose()
    await cache.aclose()
    with pytest.raises(CacheUnavailable):
        await cache.write([latest(1.0, 1)], [])
    assert await cache.ping() is False


async def test_redis_window_keys_expire_after_retention_plus_margin(
    redis_cache: RedisPriceCache, redis_url: str
) -> None:
    await redis_cache.write([latest(1.0, 1)], [second(S0 + 3)])
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        key = f"marketflow:window:exchange1:BTCUSDT:{S0}"
        ttl = await client.ttl(key)
        fields = await client.hgetall(key)
        latest_raw = await client.hget("marketflow:latest", "exchange1:BTCUSDT")
    finally:
        await client.aclose()
    assert RETENTION_S < ttl <= RETENTION_S + 120
    assert fields == {str(S0 + 3): "1.0,2.5,2.25,2"}
    assert latest_raw is not None
    assert orjson.loads(latest_raw) == {"price": 1.0, "timestamp": 1, "received": 6}


async def test_a_window_key_gets_its_ttl_once_and_again_after_redis_lost_it(
    redis_cache: RedisPriceCache, redis_url: str
) -> None:
    key = f"marketflow:window:exchange1:BTCUSDT:{S0}"
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await redis_cache.write([], [second(S0 + 1)])
        assert RETENTION_S < await client.ttl(key) <= RETENTION_S + 120
        await client.persist(key)  # a later write no longer sends EXPIRE for this key ...
        await redis_cache.write([], [second(S0 + 2)])
        assert await client.ttl(key) == -1
        await client.flushall()  # ... until Redis comes back empty (the sentinel is gone)
        assert await redis_cache.write([], [second(S0 + 3)]) is True
        await redis_cache.write([], [second(S0 + 3, count=3)])
        assert RETENTION_S < await client.ttl(key) <= RETENTION_S + 120
    finally:
        await client.aclose()


async def test_redis_write_is_one_round_trip(
    redis_cache: RedisPriceCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    await redis_cache.write([latest(0.5, 0)], [])  # the write link connects beforehand
    sends: list[int] = []
    original = Connection.send_packed_command

    async def counting(self: Connection, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        await original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    await redis_cache.write(
        [latest(1.0, 1), latest(2.0, 2, "exchange2")],
        [second(S0), second(S0 + 61), second(S0 + 1)],
    )
    assert len(sends) == 1


async def test_redis_write_reconnects_when_redis_drops_its_connection(
    redis_cache: RedisPriceCache, redis_url: str
) -> None:
    await redis_cache.write([latest(1.0, 1)], [])
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.client_kill_filter(_type="normal", skipme=True) >= 1
        assert await redis_cache.write([latest(2.0, 2)], [second(S0)]) is False
        raw = await client.hget("marketflow:latest", "exchange1:BTCUSDT")
        assert raw is not None
        assert orjson.loads(raw)["price"] == 2.0
    finally:
        await client.aclose()


async def test_redis_write_link_authenticates_and_selects_the_urls_database() -> None:
    # The flusher's own connection is made from the client's settings: password and db too.
    secret = secrets.token_hex(8)
    with RedisServer() as server:
        admin = aioredis.Redis.from_url(server.url)
        await admin.config_set("requirepass", secret)
        await admin.aclose()
        db3 = f"redis://127.0.0.1:{server.port}/3"
        settings = RedisSettings(url=db3, password=SecretStr(secret))
        async with await open_redis(settings, RETENTION_S) as cache:
            assert await cache.write([latest(1.0, 1)], [second(S0)]) is True
            assert await cache.load(S0) == ([latest(1.0, 1)], [second(S0)])
        in_db3 = aioredis.Redis.from_url(db3, password=secret)
        in_db0 = aioredis.Redis.from_url(server.url, password=secret)
        try:
            assert await in_db3.hexists("marketflow:latest", "exchange1:BTCUSDT")
            assert not await in_db0.exists("marketflow:latest")
        finally:
            await in_db3.aclose()
            await in_db0.aclose()


async def test_memory_cache_forgets_seconds_after_retention() -> None:
    clock = FakeMonotonic()
    cache = MemoryPriceCache(RETENTION_S, clock=clock)
    await cache.write([latest(1.0, 1)], [second(S0)])
    clock.now += RETENTION_S + 119
    assert (await cache.load(0))[1] == [second(S0)]
    clock.now += 2
    assert await cache.load(0) == ([latest(1.0, 1)], [])


async def test_redis_unreachable_at_open_raises_cache_unavailable() -> None:
    settings = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=1.0)
    with pytest.raises(CacheUnavailable):
        await open_redis(settings, RETENTION_S)


async def test_redis_layout_is_exact_text_and_foreign_latest_values_are_judged_by_timestamp(
    redis_cache: RedisPriceCache, redis_url: str
) -> None:
    """The documented layout, byte for byte: the script builds the values from orjson's text
    (a price keeps its shortest round-trip form), a minute key met twice in one write keeps
    both runs' seconds, and a latest value another tool wrote is replaced only when it is
    older or has no numeric timestamp."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.hset(
            "marketflow:latest",
            mapping={
                "exchange2:BTCUSDT": '{"price": 9.0, "timestamp": 5000000000000}',  # newer
                "exchange3:BTCUSDT": "not json",
            },
        )
        p = LatestPrice("exchange1", "BTCUSDT", 0.1 + 0.2, 1_700_000_000_123, 1_700_000_000_456)
        await redis_cache.write(
            [p, latest(1e-05, 7, "exchange2"), latest(2.5, 8, "exchange3")],
            [second(S0, 0.1 + 0.2), second(S0 + 61), second(S0 + 2, 1e16, count=1)],
        )
        got = await client.hgetall("marketflow:latest")
        assert (
            got["exchange1:BTCUSDT"]
            == orjson.dumps(
                {"price": p.price, "timestamp": p.timestamp_ms, "received": p.received_ms}
            ).decode()
        )
        assert got["exchange1:BTCUSDT"] == (
            '{"price":0.30000000000000004,"timestamp":1700000000123,"received":1700000000456}'
        )
        assert got["exchange2:BTCUSDT"] == '{"price": 9.0, "timestamp": 5000000000000}'
        assert got["exchange3:BTCUSDT"] == '{"price":2.5,"timestamp":8,"received":13}'

        def text(b: SecondBucket) -> str:
            return orjson.dumps([b.low, b.high, b.total, b.count]).decode()[1:-1]

        window = await client.hgetall(f"marketflow:window:exchange1:BTCUSDT:{S0}")
        first, big = second(S0, 0.1 + 0.2), second(S0 + 2, 1e16, count=1)
        assert window == {str(S0): text(first), str(S0 + 2): text(big)}
        assert window[str(S0)] == "0.30000000000000004,1.8,0.8500000000000001,2"
        assert await client.hgetall(f"marketflow:window:exchange1:BTCUSDT:{S0 + 60}") == {
            str(S0 + 61): "1.0,2.5,2.25,2"
        }
    finally:
        await client.aclose()


async def test_load_reads_only_the_wanted_pairs(cache: Cache) -> None:
    """A node taking partitions over reads its symbols' keys, not the whole cache."""
    eth = SecondBucket("exchange2", "ETHUSDT", S0 + 5, 3.0, 4.0, 7.0, 2)
    await cache.write(
        [latest(1.0, 1_000), LatestPrice("exchange2", "ETHUSDT", 3.5, 2_000, 2_005)],
        [second(S0), second(S0 + 61), eth],
    )
    got_latest, got_seconds = await cache.load(0, lambda ex, sym: sym == "ETHUSDT")
    assert [(p.exchange, p.symbol) for p in got_latest] == [("exchange2", "ETHUSDT")]
    assert got_seconds == [eth]
    everything = await cache.load(0)
    assert sorted(everything[1]) == sorted([second(S0), second(S0 + 61), eth])


async def test_redis_load_in_chunks_reads_what_one_pipeline_reads(
    redis_cache: RedisPriceCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    buckets = [second(S0 + 60 * m + k) for m in range(7) for k in range(3)]
    await redis_cache.write([latest(1.0, 1_000)], buckets)
    whole = await redis_cache.load(0)
    monkeypatch.setattr("marketflow.adapters.redis_cache.LOAD_CHUNK_KEYS", 2)
    chunked = await redis_cache.load(0)
    assert sorted(chunked[1]) == sorted(whole[1]) == sorted(buckets)
    assert chunked[0] == whole[0]


async def test_a_write_larger_than_one_encoded_part_keeps_every_second(cache: Cache) -> None:
    """A big flush is encoded a part at a time (redis_cache.ENCODE_PART_SECONDS), with the
    loop served between parts: every second still lands, under its own minute key, whether
    the window's names are the same objects or equal copies."""
    from marketflow.adapters.redis_cache import ENCODE_PART_SECONDS

    n = 2 * ENCODE_PART_SECONDS + 7
    assert n < 6000
    buckets = [  # names joined anew for each second: equal, not the same objects
        SecondBucket(f"ex{i // 500}", "".join(["BTC", "USDT"]), S0 + i % 500, 1.0, 2.0, i, 1)
        for i in range(n)
    ]
    await cache.write([latest(1.0, 1)], buckets)
    _, seconds = await cache.load(S0)
    key = lambda b: (b.exchange, b.second)  # noqa: E731
    assert sorted(seconds, key=key) == sorted(buckets, key=key)
