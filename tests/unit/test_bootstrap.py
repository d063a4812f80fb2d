"""Start-up against a configured PostgreSQL/Redis: fall back or wait, never log credentials."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import pytest

from marketflow.adapters.postgres.minute_store import open_postgres
from marketflow.adapters.redis_cache import open_redis
from marketflow.domain.errors import StoreUnavailable
from marketflow.settings import PostgresSettings, RedisSettings
from marketflow.startup import _host_of, _open_configured
from tests.harness.services import free_port

SECRET = "s3cr3t-pw"  # noqa: S105 - a marker to look for in the log


def failing_then(result: str, failures: int) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    calls: list[int] = []

    async def opener() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise StoreUnavailable("connection refused")
        return result

    return opener, calls


async def test_unreachable_service_falls_back_when_policy_is_embedded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    opener, calls = failing_then("store", failures=1)
    caplog.set_level(logging.WARNING, "marketflow")

    got = await _open_configured(
        "postgres", f"postgresql://u:{SECRET}@db:5432/x", "embedded", opener
    )

    assert got is None
    assert len(calls) == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert line == "postgres_unreachable host=db:5432 error=connection refused fallback=embedded"


async def test_unreachable_service_is_retried_until_it_answers_when_policy_is_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    opener, calls = failing_then("store", failures=3)
    caplog.set_level(logging.WARNING, "marketflow")

    got = await _open_configured("postgres", "postgresql://db/x", "wait", opener, retry_s=0.0)

    assert got == "store"
    assert len(calls) == 4
    attempts = [re.search(r"attempt=(\d+)", r.getMessage()) for r in caplog.records]
    assert [int(m.group(1)) for m in attempts if m] == [1, 2, 3]


def test_logged_host_never_carries_credentials() -> None:
    assert _host_of("postgresql://user:secret@db.example:5432/marketflow") == "db.example:5432"
    assert _host_of("redis://:secret@cache:6379/0") == "cache:6379"
    assert _host_of("postgresql://db.example/marketflow") == "db.example"


@pytest.mark.parametrize("policy", ["embedded", "wait"])
async def test_credentials_never_reach_the_log_from_real_connection_errors(
    policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The real drivers' errors against a port nobody listens on, under both policies."""
    port = free_port()
    pg = PostgresSettings(dsn=f"postgresql://marketflow:{SECRET}@127.0.0.1:{port}/db",
                          connect_timeout_s=1.0)  # fmt: skip
    rd = RedisSettings(url=f"redis://:{SECRET}@127.0.0.1:{port}/0", connect_timeout_s=1.0)
    caplog.set_level(logging.DEBUG)

    for name, url, real in (
        ("postgres", pg.dsn, lambda: open_postgres(pg)),
        ("redis", rd.url, lambda: open_redis(rd, 60)),
    ):
        tries: list[int] = []

        async def opener(
            real: Callable[[], Awaitable[object]] = real, tries: list[int] = tries
        ) -> object:
            tries.append(1)
            if len(tries) == 3:  # "wait" gives up only when the service answers
                return "up"
            return await real()

        got = await _open_configured(name, url, policy, opener, retry_s=0.0)  # type: ignore[arg-type]
        assert got == (None if policy == "embedded" else "up")
        assert len(tries) == (1 if policy == "embedded" else 3)

    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count("_unreachable") == (2 if policy == "embedded" else 4), text
    assert SECRET not in text
    if policy == "embedded":
        assert f"host=127.0.0.1:{port}" in text
