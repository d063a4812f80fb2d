"""Embedded SQLite minute store: the same contract as PostgreSQL, in one local file.

Used when no PostgreSQL is configured or reachable at start. One connection, in WAL mode,
driven from worker threads (``asyncio.to_thread``) one call at a time under an asyncio lock,
so the event loop never blocks on disk. Timestamps are integer Unix milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from marketflow.domain.aggregates import Aggregate, MinuteRow
from marketflow.domain.errors import StoreUnavailable
from marketflow.settings import EmbeddedSettings

log = logging.getLogger("marketflow.sqlite")

T = TypeVar("T")

FILE_NAME = "marketflow.sqlite3"

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        # NaN arrives as NULL in SQLite (NOT NULL refuses it); 9e999 is +Infinity.
        """
        CREATE TABLE minute_prices (
            pair_name TEXT NOT NULL,
            exchange TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            average_price REAL NOT NULL,
            min_price REAL NOT NULL,
            max_price REAL NOT NULL,
            tick_count INTEGER NOT NULL,
            PRIMARY KEY (exchange, pair_name, timestamp),
            CHECK (
                tick_count > 0
                AND min_price > 0 AND min_price < 9e999
                AND max_price > 0 AND max_price < 9e999
                AND average_price > 0 AND average_price < 9e999
                AND min_price <= max_price
            )
        )
        """,
    ),
    (2, "CREATE INDEX minute_prices_timestamp_idx ON minute_prices (timestamp)"),
)

_UPSERT = """
INSERT INTO minute_prices
    (exchange, pair_name, timestamp, average_price, min_price, max_price, tick_count)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (exchange, pair_name, timestamp) DO UPDATE SET
    average_price = excluded.average_price,
    min_price = excluded.min_price,
    max_price = excluded.max_price,
    tick_count = excluded.tick_count
"""

# Refused for the row's content (constraint, value out of range), not for the file.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    OverflowError,
)
# The file is unusable now (locked, disk full, I/O error, deleted directory).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    sqlite3.DatabaseError,
    OSError,
)


def sqlite_path(settings: EmbeddedSettings) -> Path:
    """Where the embedded store keeps its file."""
    return settings.data_dir / FILE_NAME


def _params(row: MinuteRow) -> tuple[object, ...]:
    return (row.exchange, row.symbol, row.minute_ms, row.average, row.low, row.high, row.count)


class SqliteMinuteStore:
    """``MinuteStore`` on a local SQLite file; concurrent callers are serialised."""

    kind = "sqlite"

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._closed = False
        self.rejected_rows = 0  # rows the database refused for their content (logged)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            if self._closed:
                raise StoreUnavailable("sqlite: store is closed")
            try:
                return await asyncio.to_thread(self._locked, fn)
            except UNAVAILABLE_ERRORS as exc:
                raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # A cancelled caller releases the asyncio lock while its thread still runs; this lock
        # keeps the next call off the connection until that thread is done.
        with self._thread_lock:
            return fn(self._conn)

    async def upsert_minutes(self, rows: Sequence[MinuteRow]) -> None:
        """Write ``rows`` in one transaction; overwrite existing keys. Bad rows are skipped."""
        batch = list({r.key: r for r in rows}.values())
        if batch:
            self.rejected_rows += await self._call(lambda c: _write(c, batch))

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> Aggregate | None:
        """Merged rows of ``symbol`` per exchange before its bound (and after ``since_ms``)."""
        if not before:
            return None
        items = list(before.items())
        return await self._call(lambda c: _history(c, symbol, items, since_ms))

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        """Rows whose minute starts at or after ``since_ms``, oldest first."""
        return await self._call(lambda c: _since(c, since_ms))

    async def ping(self) -> bool:
        """True when the file answers a query."""
        try:
            await self._call(lambda c: c.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        """Close the connection; safe to call twice."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await asyncio.to_thread(self._locked, lambda c: c.close())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _write(conn: sqlite3.Connection, batch: list[MinuteRow]) -> int:
    """Upsert in one transaction; on a data error retry halves. Returns rows rejected."""
    try:
        conn.execute("BEGIN")  # one transaction per batch: all rows or none
        try:
            conn.executemany(_UPSERT, [_params(r) for r in batch])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except DATA_ERRORS as exc:
        if len(batch) == 1:
            # The row is the useful part; a traceback of the split adds nothing.
            log.error("minute_row_rejected row=%r error=%s", batch[0], exc)  # noqa: TRY400
            return 1
        mid = len(batch) // 2
        return _write(conn, batch[:mid]) + _write(conn, batch[mid:])
    return 0


def _history(
    conn: sqlite3.Connection, symbol: str, bounds: list[tuple[str, int]], since_ms: int | None
) -> Aggregate | None:
    # A VALUES list stands in for PostgreSQL's unnest: one query for every exchange's bound.
    values = ",".join("(?, ?)" for _ in bounds)
    params: list[object] = [v for pair in bounds for v in pair]
    sql = (
        f"WITH b(exchange, bound_ms) AS (VALUES {values}) "  # noqa: S608 (placeholders only)
        "SELECT min(r.min_price), max(r.max_price), sum(r.average_price * r.tick_count), "
        "sum(r.tick_count) FROM minute_prices r JOIN b ON r.exchange = b.exchange "
        "WHERE r.pair_name = ? AND r.timestamp < b.bound_ms"
    )
    params.append(symbol)
    if since_ms is not None:
        sql += " AND r.timestamp > ?"
        params.append(since_ms - 60_000)
    rec = conn.execute(sql, params).fetchone()
    if rec is None or not rec[3]:
        return None
    return Aggregate(rec[0], rec[1], rec[2], rec[3])


def _since(conn: sqlite3.Connection, since_ms: int) -> list[MinuteRow]:
    cur = conn.execute(
        "SELECT exchange, pair_name, timestamp, average_price, min_price, max_price, tick_count"
        " FROM minute_prices WHERE timestamp >= ? ORDER BY timestamp, exchange, pair_name",
        (since_ms,),
    )
    return [MinuteRow(*r) for r in cur.fetchall()]


def _migrate(conn: sqlite3.Connection) -> list[int]:
    applied: list[int] = []
    # BEGIN IMMEDIATE takes the write lock first: a second process opening the same file
    # waits instead of applying the same migration twice.
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        (current,) = conn.execute(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        ).fetchone()
        for version, sql in MIGRATIONS:
            if version > current:
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
                applied.append(version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (``with conn`` / BEGIN), nothing implicit.
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        applied = _migrate(conn)
    except BaseException:
        conn.close()
        raise
    if applied:
        log.info("sqlite_migrated path=%s versions=%s", path, applied)
    return conn


async def open_sqlite(path: Path) -> SqliteMinuteStore:
    """Open (creating if needed) the SQLite file at ``path`` and bring its schema up to date.

    Raises StoreUnavailable when the file cannot be opened or written.
    """
    try:
        conn = await asyncio.to_thread(_open, path)
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"sqlite {path}: {exc}") from exc
    return SqliteMinuteStore(conn, path)
