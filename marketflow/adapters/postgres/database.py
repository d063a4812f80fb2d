"""The PostgreSQL plumbing every store shares: one pool per daemon, one translation of
driver errors into ``StoreUnavailable`` (in the manner of httpx's map_httpcore_exceptions),
one versioned migration runner for every table (``migrations.py``).

Stores receive a ``Database`` and never open connections of their own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from marketflow.adapters.postgres.migrations import migrate
from marketflow.domain.errors import StoreUnavailable
from marketflow.settings import PostgresSettings

log = logging.getLogger("marketflow.postgres")

T = TypeVar("T")

POOL_MAX = 6  # minute writer, capture writer, API queries, restore: none waits for another
COMMAND_TIMEOUT_S = 30.0  # a hung server must become StoreUnavailable, not a stuck writer
_SEND_BUFFER = 4 << 20  # a socket send buffer that holds a whole COPY batch

# The server or the network is gone (as opposed to the data being refused).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
)
# What a connection that died while idle in the pool reports on its next use.
STALE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    ConnectionResetError,
    BrokenPipeError,
)
# The statement was refused because of what a row contains.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
# At open, a refusal (bad password, missing database) also means "not usable now".
_OPEN_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Database:
    """One pool to one PostgreSQL database, shared by every store of the daemon."""

    def __init__(self, pool: asyncpg.Pool, identity: str) -> None:
        self._pool = pool
        self.identity = identity  # this database's own id (a spill file is for one only)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection, translating connection failures.

        A pooled connection may have died with a server restart since its last use: that
        first failure is retried once on a fresh connection (callers pass idempotent work),
        so a quick restart is not reported as an outage.
        """
        for attempt in (1, 2):
            if self._closed:
                raise StoreUnavailable("postgres: store is closed")
            try:
                async with self._pool.acquire() as conn:
                    return await op(conn)
            except STALE_ERRORS as exc:
                if attempt == 1:
                    log.info("postgres_stale_connection error=%s action=retry", describe(exc))
                    continue
                raise StoreUnavailable(f"postgres: {describe(exc)}") from exc
            except CONNECTION_ERRORS as exc:
                raise StoreUnavailable(f"postgres: {describe(exc)}") from exc
        raise AssertionError("unreachable")

    async def ping(self) -> bool:
        if self._closed:
            return False
        try:
            await self.run(lambda conn: conn.fetchval("SELECT 1"))
        except StoreUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        """Close the pool (waits for running queries); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._pool.close(), COMMAND_TIMEOUT_S)
        except TimeoutError:
            self._pool.terminate()


async def _tune_socket(conn: asyncpg.Connection) -> None:
    """Give the connection a send buffer that holds a whole COPY batch (a few MB)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)


async def _reset(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (RESET ALL, CLOSE ALL, UNLISTEN *, advisory
    unlock: session state no store here creates), which cost a round trip per COPY batch
    while the database waited; only a transaction left open is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def open_database(settings: PostgresSettings) -> Database:
    """Connect a pool and bring every table up to date.

    Raises StoreUnavailable when the server cannot be reached or refuses us (bad password,
    missing database): the caller decides between waiting and the embedded store.
    """
    password = settings.password.get_secret_value() if settings.password else None
    timeout = settings.connect_timeout_s
    pool: asyncpg.Pool | None = None
    try:
        async with asyncio.timeout(timeout * 2 + 1):
            pool = await asyncpg.create_pool(
                dsn=settings.dsn,
                password=password,
                min_size=1,
                max_size=POOL_MAX,
                timeout=timeout,
                command_timeout=COMMAND_TIMEOUT_S,
                init=_tune_socket,
                reset=_reset,
            )
            async with pool.acquire() as conn:
                await migrate(conn)
                identity = await _instance_id(conn)
    except _OPEN_ERRORS as exc:
        if pool is not None:
            pool.terminate()
        raise StoreUnavailable(f"postgres: {describe(exc)}") from exc
    return Database(pool, identity)


async def _instance_id(conn: Conn) -> str:
    """This database's own random id (made once)."""
    await conn.execute(
        "INSERT INTO marketflow_instance (id) VALUES ($1) ON CONFLICT DO NOTHING",
        uuid.uuid4().hex,
    )
    got: str = await conn.fetchval("SELECT id FROM marketflow_instance")
    return f"postgres-{got[:16]}"
