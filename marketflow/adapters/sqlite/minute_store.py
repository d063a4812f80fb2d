"""Embedded SQLite minute store: the same contract as PostgreSQL, in one local file.

Used when no PostgreSQL is configured or reachable at start, on the shared SQLite plumbing
(``database.py``: the event loop never blocks on disk). Timestamps are integer Unix ms.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

from marketflow.adapters.minute_codec import decode_seconds, encode_seconds
from marketflow.adapters.sqlite.database import SqliteDatabase, open_database
from marketflow.domain.aggregates import Aggregate, History, Mark, MinuteRow
from marketflow.lifecycle import Closing

log = logging.getLogger("marketflow.sqlite")

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
    (
        3,
        """
        ALTER TABLE minute_prices ADD COLUMN covered_ms INTEGER
            CHECK (covered_ms BETWEEN 0 AND 60000);
        ALTER TABLE minute_prices ADD COLUMN seconds BLOB;
        CREATE TABLE source_marks (
            source TEXT PRIMARY KEY, position INTEGER NOT NULL, made_ms INTEGER NOT NULL
        );
        """,
    ),
)

# A stored row is replaced only by one with at least as many ticks: it never shrinks.
_UPSERT = """
INSERT INTO minute_prices
    (exchange, pair_name, timestamp, average_price, min_price, max_price, tick_count,
     covered_ms, seconds)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (exchange, pair_name, timestamp) DO UPDATE SET
    average_price = excluded.average_price,
    min_price = excluded.min_price,
    max_price = excluded.max_price,
    tick_count = excluded.tick_count,
    covered_ms = max(coalesce(minute_prices.covered_ms, excluded.covered_ms),
                     coalesce(excluded.covered_ms, minute_prices.covered_ms)),
    seconds = excluded.seconds
WHERE minute_prices.tick_count <= excluded.tick_count
"""

_MARKS = """
INSERT INTO source_marks (source, position, made_ms) VALUES (?, ?, ?)
ON CONFLICT (source) DO UPDATE SET position = excluded.position, made_ms = excluded.made_ms
WHERE source_marks.made_ms <= excluded.made_ms
"""

_ROW_COLUMNS = (
    "exchange, pair_name, timestamp, average_price, min_price, max_price, tick_count,"
    " covered_ms, seconds"
)

# Refused for the row's content (constraint, value out of range), not for the file.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    OverflowError,
)


def _params(row: MinuteRow) -> tuple[object, ...]:
    return (
        row.exchange,
        row.symbol,
        row.minute_ms,
        row.average,
        row.low,
        row.high,
        row.count,
        row.covered_ms,
        encode_seconds(row.minute_ms, row.seconds, row.packed),
    )


def _row(r: tuple[object, ...]) -> MinuteRow:
    ex, sym, m, avg, lo, hi, n, cov, secs = r
    assert isinstance(m, int)
    assert isinstance(secs, bytes | None)
    assert isinstance(avg, float)
    assert isinstance(lo, float)
    assert isinstance(hi, float)
    assert isinstance(n, int)
    assert isinstance(cov, int | None)
    return MinuteRow(str(ex), str(sym), m, avg, lo, hi, n, cov, decode_seconds(m, secs))


class SqliteMinuteStore(Closing):
    """``MinuteStore`` on a local SQLite file; concurrent callers are serialised."""

    kind = "sqlite"

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self.path = db.path
        self.identity = db.identity
        self.rejected_rows = 0  # rows the database refused for their content (logged)
        self.kept_rows = 0  # rewrites refused because the stored row had more ticks

    async def upsert_minutes(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None:
        """Write ``rows`` and ``marks`` in one transaction; a stored row never shrinks.

        Bad rows are skipped (logged and counted), the rest of the batch is written."""
        batch = list({r.key: r for r in rows}.values())
        if not batch and not marks:
            return
        mark_params = [(n, p, m) for n, (p, m) in (marks or {}).items()]
        rejected, kept = await self._db.run(lambda c: _write_all(c, batch, mark_params))
        self.rejected_rows += rejected
        if kept:
            self.kept_rows += kept
            log.warning("minute_rows_kept reason=stored_row_has_more_ticks rows=%d", kept)

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> History:
        """Merged rows of ``symbol`` per exchange before its bound, from ``since_ms`` on (the
        minute holding ``since_ms`` counts its seconds from there)."""
        if not before:
            return History(None)
        items = list(before.items())
        return await self._db.run(lambda c: _history(c, symbol, items, since_ms))

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        """Rows whose minute starts at or after ``since_ms``, oldest first."""
        return await self._db.run(lambda c: _since(c, since_ms))

    async def newest_minute_ms(self) -> int | None:
        (got,) = await self._db.run(
            lambda c: c.execute("SELECT max(timestamp) FROM minute_prices").fetchone()
        )
        return None if got is None else int(got)

    async def load_marks(self) -> dict[str, Mark]:
        rows = await self._db.run(
            lambda c: c.execute("SELECT source, position, made_ms FROM source_marks").fetchall()
        )
        return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}

    async def ping(self) -> bool:
        """True when the file answers a query."""
        return await self._db.ping()

    async def aclose(self) -> None:
        """Close the file; safe to call twice."""
        await self._db.aclose()


def _write_all(
    conn: sqlite3.Connection, batch: list[MinuteRow], marks: list[tuple[str, int, int]]
) -> tuple[int, int]:
    """Rows and marks in one transaction; returns (rows rejected, rows kept as stored)."""
    conn.execute("BEGIN")
    try:
        rejected, kept = _write(conn, batch) if batch else (0, 0)
        if marks:
            conn.executemany(_MARKS, marks)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rejected, kept


def _write(conn: sqlite3.Connection, batch: list[MinuteRow]) -> tuple[int, int]:
    """Upsert under a savepoint; on a data error retry halves. Returns (rejected, kept)."""
    before = conn.total_changes
    try:
        conn.execute("SAVEPOINT minute_batch")
        try:
            conn.executemany(_UPSERT, [_params(r) for r in batch])
            conn.execute("RELEASE minute_batch")
        except BaseException:
            conn.execute("ROLLBACK TO minute_batch")
            conn.execute("RELEASE minute_batch")
            raise
    except DATA_ERRORS as exc:
        if len(batch) == 1:
            # The row is the useful part; a traceback of the split adds nothing.
            log.error("minute_row_rejected row=%r error=%s", batch[0], exc)  # noqa: TRY400
            return 1, 0
        mid = len(batch) // 2
        a = _write(conn, batch[:mid])
        b = _write(conn, batch[mid:])
        return a[0] + b[0], a[1] + b[1]
    return 0, len(batch) - (conn.total_changes - before)


def _history(
    conn: sqlite3.Connection, symbol: str, bounds: list[tuple[str, int]], since_ms: int | None
) -> History:
    # A VALUES list stands in for PostgreSQL's unnest: one query for every exchange's bound.
    values = ",".join("(?, ?)" for _ in bounds)
    params: list[object] = [v for pair in bounds for v in pair]
    cte = f"WITH b(exchange, bound_ms) AS (VALUES {values}) "  # placeholders only
    where = " FROM minute_prices r JOIN b ON r.exchange = b.exchange WHERE r.pair_name = ?"
    where += " AND r.timestamp < b.bound_ms"
    params.append(symbol)
    start = None if since_ms is None else -(-since_ms // 60_000) * 60_000
    if start is not None:
        where += " AND r.timestamp >= ?"
        params.append(start)
    sql = (
        cte + "SELECT min(r.min_price), max(r.max_price), sum(r.average_price * r.tick_count),"
        " sum(r.tick_count), count(*),"
        " sum(r.covered_ms IS NULL OR r.covered_ms < 60000)" + where
    )
    rec = conn.execute(sql, params).fetchone()
    out = History(None)
    if rec is not None and rec[3]:
        low_ms = _arg(conn, cte + "SELECT r.timestamp" + where, params, "r.min_price")
        high_ms = _arg(conn, cte + "SELECT r.timestamp" + where, params, "r.max_price DESC")
        out = History(Aggregate(rec[0], rec[1], rec[2], rec[3], low_ms, high_ms), rec[4], rec[5])
    if since_ms is not None and start is not None and start != since_ms:
        columns = ", ".join("r." + c.strip() for c in _ROW_COLUMNS.split(","))
        sql = (
            cte + f"SELECT {columns}"  # noqa: S608 (constants and placeholders only)
            " FROM minute_prices r JOIN b ON r.exchange = b.exchange"
            " WHERE r.pair_name = ? AND r.timestamp = ? AND r.timestamp < b.bound_ms"
        )
        boundary = [*params[: len(bounds) * 2], symbol, start - 60_000]
        out.add_partial([_row(r) for r in conn.execute(sql, boundary)], since_ms // 1000)
    return out


def _arg(conn: sqlite3.Connection, sql: str, params: list[object], order: str) -> int:
    """The minute of the row first in ``order`` (the newest among equals)."""
    rec = conn.execute(f"{sql} ORDER BY {order}, r.timestamp DESC LIMIT 1", params).fetchone()
    return int(rec[0]) if rec else 0


def _since(conn: sqlite3.Connection, since_ms: int) -> list[MinuteRow]:
    cur = conn.execute(
        f"SELECT {_ROW_COLUMNS} FROM minute_prices WHERE timestamp >= ?"  # noqa: S608
        " ORDER BY timestamp, exchange, pair_name",
        (since_ms,),
    )
    return [_row(r) for r in cur.fetchall()]


async def open_sqlite(path: Path) -> SqliteMinuteStore:
    """Open (creating if needed) the SQLite file at ``path`` and bring its schema up to date.

    Raises StoreUnavailable when the file cannot be opened or written.
    """
    return SqliteMinuteStore(await open_database(path, MIGRATIONS))
