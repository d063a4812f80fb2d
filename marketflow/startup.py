"""What the daemon opens before its pipeline: the port, storage and cache (with the start-up
policy for a service that is not there yet), a spill file of an older version, GC settings.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, TypeVar

from marketflow.adapters.memory_cache import MemoryPriceCache
from marketflow.adapters.postgres.database import Database, open_database
from marketflow.adapters.redis_cache import open_redis
from marketflow.backoff import Backoff
from marketflow.domain.errors import CacheUnavailable, ConfigError, StoreUnavailable
from marketflow.domain.ports import PriceCache
from marketflow.settings import Settings

log = logging.getLogger("marketflow")

T = TypeVar("T")


async def _open_configured(
    name: str,
    url: str,
    policy: Literal["embedded", "wait"],
    opener: Callable[[], Awaitable[T]],
    retry_s: float = 2.0,
    rng: random.Random | None = None,
) -> T | None:
    """The configured service, or None when it is unreachable and ``policy`` is "embedded";
    with "wait", retry every ``retry_s`` (jittered down to half of it, so daemons started
    together spread out) until it answers (a service started before its database)."""
    backoff = Backoff(retry_s, retry_s, rng or random.Random())  # a fixed policy, jittered
    attempt = 0
    while True:
        attempt += 1
        try:
            return await opener()
        except (StoreUnavailable, CacheUnavailable) as exc:
            if policy == "embedded":
                log.warning("%s_unreachable host=%s error=%s fallback=embedded",
                            name, _host_of(url), exc)  # fmt: skip
                return None
            delay = backoff.fail()
            log.warning("%s_unreachable attempt=%d error=%s retry_in_s=%.2f",
                        name, attempt, exc, delay)  # fmt: skip
            await asyncio.sleep(delay)


async def open_storage(settings: Settings) -> Database | None:
    """The configured PostgreSQL, or None for the embedded SQLite files (not configured, or
    unreachable at start with the "embedded" policy)."""
    pg = settings.postgres
    if not pg.dsn:
        return None
    return await _open_configured(
        "postgres", pg.dsn, pg.unreachable_at_start, lambda: open_database(pg)
    )


async def open_cache(settings: Settings) -> tuple[PriceCache, bool]:
    """Redis when configured and reachable, else the in-process cache."""
    rs = settings.redis
    retention = settings.pipeline.window_retention_s
    if rs.url:
        cache = await _open_configured(
            "redis", rs.url, rs.unreachable_at_start, lambda: open_redis(rs, retention)
        )
        if cache is not None:
            return cache, False
    log.warning("cache_embedded kind=memory")
    return MemoryPriceCache(retention), True


def _host_of(url: str) -> str:
    """Host part of a DSN/URL for logs, never the credentials."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("/", 1)[0]


def adopt_spill(legacy: Path, spill: Path) -> None:
    """Move a spill file of an older version (one file for any store) to ``spill``."""
    if not legacy.exists():
        return
    if spill.exists():
        with spill.open("ab") as out:
            out.write(legacy.read_bytes())
            out.flush()
            os.fsync(out.fileno())
        legacy.unlink()
    else:
        os.replace(legacy, spill)
    log.warning("minute_spill_adopted from=%s to=%s", legacy, spill)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind the HTTP port now, so 'address in use' is reported before anything else starts."""
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def tune_gc(gen0_threshold: int = 50_000) -> None:
    """Fewer, cheaper cyclic collections: the hot path allocates short-lived lists and
    tuples by the million, none of them in cycles, so the default gen0 threshold (700) makes
    the collector run thousands of times a second for nothing. Objects alive after start
    (modules, settings, adapters) are frozen out of every later collection.
    ``gen0_threshold`` 0 keeps CPython's default thresholds (for comparison: bench.api)."""
    gc.collect()
    gc.freeze()
    if gen0_threshold:
        gc.set_threshold(gen0_threshold, 50, 100)
    else:
        gc.set_threshold(700, 10, 10)
