"""Fixtures for real services: session-wide servers, a fresh database per test, and private
servers that fault tests may stop and restart.

Missing server binaries FAIL the tests that need them (with the command that installs them):
a skipped integration suite looks green while testing nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from tests.harness.services import (
    KafkaServer,
    PostgresServer,
    RedisServer,
    ServerBinaryMissing,
)

# Hypothesis's per-example deadline is a timed assertion: on a machine shared with other jobs
# an example that takes 270 ms instead of 200 fails a test that found nothing wrong.
settings.register_profile("marketflow", deadline=None)
settings.load_profile("marketflow")


def _postgres() -> PostgresServer:
    try:
        return PostgresServer()
    except ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def _redis() -> RedisServer:
    try:
        return RedisServer()
    except ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session; tests get their own database on it (``pg_dsn``)."""
    with _postgres() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session; ``redis_url`` empties it before each test."""
    with _redis() as server:
        yield server


@pytest.fixture
async def pg_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """DSN of a database created for this test alone (dropped afterwards)."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield postgres_server.dsn_for(name)
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        # FORCE: a test that failed half-way may leave a pool connected.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> str:
    """URL of the session Redis, emptied for this test."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    return redis_server.url


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, free to be stopped and restarted."""
    with _postgres() as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, free to be stopped and restarted."""
    with _redis() as server:
        yield server


def _kafka() -> KafkaServer:
    try:
        return KafkaServer()
    except ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[KafkaServer]:
    """One Kafka broker for the session; tests use topics and groups of their own names."""
    with _kafka() as server:
        yield server


@pytest.fixture
def private_kafka() -> Iterator[KafkaServer]:
    """A Kafka broker of this test's own, free to be killed and restarted."""
    with _kafka() as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n K --dist worksteal`` each worker first gets one contiguous K-th of the
    collection, and idle workers steal only tests not yet started. The end-to-end tests (the
    long ones: they wait on minute boundaries and restarts) are therefore dealt round-robin,
    longest first, to the front of each worker's share, so they run side by side instead of
    one after another on the worker whose share held them all. Alone, longest first too."""

    def weight(item: pytest.Item) -> float:
        marker = item.get_closest_marker("timeout")
        return float(marker.args[0]) if marker is not None and marker.args else 0.0

    long_ones = sorted((i for i in items if "/e2e/" in str(i.path)), key=weight, reverse=True)
    rest = [i for i in items if "/e2e/" not in str(i.path)]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    sizes, remaining = [], len(items)
    for k in range(workers):  # xdist's own split: each idle worker takes pending // remaining
        sizes.append(remaining // (workers - k))
        remaining -= sizes[-1]
    ordered: list[pytest.Item] = []
    for k in range(workers):
        mine = long_ones[k::workers]
        take = max(0, sizes[k] - len(mine))
        ordered += mine + rest[:take]
        rest = rest[take:]
    items[:] = ordered + rest
