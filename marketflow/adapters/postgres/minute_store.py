"""PostgreSQL minute store (asyncpg): one row per (exchange, pair, minute), written by upsert.

Schema (``minute_prices``, primary key ``(exchange, pair_name, timestamp)``)::

    pair_name text, exchange text, timestamp timestamptz (minute start, UTC),
    average_price, min_price, max_price double precision, tick_count bigint,
    covered_ms integer (0-60000: how much of the minute the source was up; NULL on rows
    written before migration 3), seconds bytea (the per-second parts, see minute_codec.py)

``source_marks`` (source, position, made_ms): where each source resumes, written in the
same transaction as the rows.

A batch is one transaction of ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE ...
WHERE`` statements (one per ``STATEMENT_ROWS`` rows, so the loop runs between them), where the
stored row has no more ticks than the new one: a retry or a restart rewrites a row, never
doubles it, and never shrinks it. A batch refused for its data (a constraint, a NUL
byte) is split until the bad rows are isolated, so one bad row never takes the rest with it.
Connection failures surface as ``StoreUnavailable``: the minute writer keeps the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from marketflow.adapters.minute_codec import decode_seconds, encode_seconds
from marketflow.adapters.postgres.database import DATA_ERRORS, Database, describe, open_database
from marketflow.domain.aggregates import Aggregate, History, Mark, MinuteRow
from marketflow.domain.archive import refuse_archived
from marketflow.lifecycle import Closing
from marketflow.settings import PostgresSettings

log = logging.getLogger("marketflow.postgres")

_UPSERT = """
INSERT INTO minute_prices
    (exchange, pair_name, timestamp, average_price, min_price, max_price, tick_count,
     covered_ms, seconds)
SELECT e, p, to_timestamp(m / 1000.0), a, lo, hi, c, cov, secs
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::float8[], $5::float8[], $6::float8[],
            $7::bigint[], $8::integer[], $9::bytea[]) AS t(e, p, m, a, lo, hi, c, cov, secs)
ON CONFLICT (exchange, pair_name, timestamp) DO UPDATE SET
    average_price = EXCLUDED.average_price,
    min_price = EXCLUDED.min_price,
    max_price = EXCLUDED.max_price,
    tick_count = EXCLUDED.tick_count,
    covered_ms = GREATEST(minute_prices.covered_ms, EXCLUDED.covered_ms),
    seconds = EXCLUDED.seconds
WHERE minute_prices.tick_count <= EXCLUDED.tick_count
"""

_MARKS = """
INSERT INTO source_marks (source, position, made_ms)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position, made_ms = EXCLUDED.made_ms
WHERE source_marks.made_ms <= EXCLUDED.made_ms
"""

_EPOCH_MS = "(extract(epoch FROM {}) * 1000)::bigint"

_LOW_AT = "(array_agg(r.timestamp ORDER BY r.min_price, r.timestamp DESC))[1]"
_HIGH_AT = "(array_agg(r.timestamp ORDER BY r.max_price DESC, r.timestamp DESC))[1]"

# The f-strings below splice constants only; every value is a $n parameter.
_HISTORY = f"""
SELECT min(r.min_price), max(r.max_price), sum(r.average_price * r.tick_count),
       sum(r.tick_count)::bigint, {_EPOCH_MS.format(_LOW_AT)}, {_EPOCH_MS.format(_HIGH_AT)},
       count(*), count(*) FILTER (WHERE r.covered_ms IS NULL OR r.covered_ms < 60000)
FROM unnest($2::text[], $3::bigint[]) AS b(exchange, bound_ms)
JOIN minute_prices r ON r.exchange = b.exchange
WHERE r.pair_name = $1
  AND r.timestamp < to_timestamp(b.bound_ms / 1000.0)
  AND ($4::bigint IS NULL OR r.timestamp >= to_timestamp($4::bigint / 1000.0))
"""  # noqa: S608

_ROW_COLUMNS = f"""exchange, pair_name, {_EPOCH_MS.format("timestamp")},
       average_price, min_price, max_price, tick_count, covered_ms, seconds"""

_AT = f"""
SELECT {_ROW_COLUMNS}
FROM unnest($2::text[], $3::bigint[]) AS b(ex, bound_ms)
JOIN minute_prices r ON r.exchange = b.ex
WHERE r.pair_name = $1 AND r.timestamp = to_timestamp($4::bigint / 1000.0)
  AND r.timestamp < to_timestamp(b.bound_ms / 1000.0)
"""  # noqa: S608

_SINCE = f"""
SELECT {_ROW_COLUMNS}
FROM minute_prices
WHERE timestamp >= to_timestamp($1::bigint / 1000.0)
ORDER BY timestamp, exchange, pair_name
"""  # noqa: S608

STATEMENT_ROWS = 5000  # rows per INSERT of a batch (~25 ms of encoding; see _write_all)

if TYPE_CHECKING:
    from marketflow.adapters.postgres.database import Conn


def _columns(rows: Sequence[MinuteRow]) -> tuple[list[Any], ...]:
    return (
        [r.exchange for r in rows],
        [r.symbol for r in rows],
        [r.minute_ms for r in rows],
        [r.average for r in rows],
        [r.low for r in rows],
        [r.high for r in rows],
        [r.count for r in rows],
        [r.covered_ms for r in rows],
        [encode_seconds(r.minute_ms, r.seconds, r.packed) for r in rows],
    )


def _row(r: asyncpg.Record) -> MinuteRow:
    return MinuteRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], decode_seconds(r[2], r[8]))


def _affected(status: str) -> int:
    """Rows an INSERT touched, from its command tag ("INSERT 0 14")."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0


def dedupe(rows: Sequence[MinuteRow]) -> list[MinuteRow]:
    """Last version per key: ON CONFLICT cannot touch one row twice in one statement."""
    return list({r.key: r for r in rows}.values())


class PostgresMinuteStore(Closing):
    """``MinuteStore`` on PostgreSQL; safe for concurrent callers (one pool connection each)."""

    kind = "postgres"

    def __init__(self, db: Database, *, owns_db: bool = False) -> None:
        self._db = db
        self._owns_db = owns_db  # opened by open_postgres(): closed with the store
        self.identity = db.identity
        self.rejected_rows = 0  # rows the database refused for their content (logged)
        self.kept_rows = 0  # rewrites refused because the stored row had more ticks
        # -- archive (issue 14): rows of a day already in the Parquet archive, refused
        self.refused_archived_rows = 0

    async def upsert_minutes(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None:
        """Write ``rows`` and ``marks`` in one transaction; a stored row never shrinks.

        Bad rows are skipped (logged and counted), the rest of the batch is written.
        """
        batch = dedupe(rows)
        if not batch and not marks:
            return
        await self._db.run(lambda conn: self._write_all(conn, batch, marks))

    async def _write_all(
        self, conn: Conn, batch: list[MinuteRow], marks: Mapping[str, Mark] | None
    ) -> None:
        async with conn.transaction():
            if batch:
                batch = await self._refuse_archived(conn, batch)
            # One statement per STATEMENT_ROWS rows: asyncpg encodes a statement's arguments
            # in one go, and 50,000 rows (a backfill's minutes closing together at 500 pairs
            # x 10 exchanges) held the loop 160-360 ms; between two the loop runs.
            for i in range(0, len(batch), STATEMENT_ROWS):
                await self._write(conn, batch[i : i + STATEMENT_ROWS])
            if marks:
                names = list(marks)
                await conn.execute(
                    _MARKS, names, [marks[n][0] for n in names], [marks[n][1] for n in names]
                )

    async def _refuse_archived(self, conn: Conn, batch: list[MinuteRow]) -> list[MinuteRow]:
        """Drop (count, log) rows of days already archived: one short statement per batch.

        FOR SHARE: the archive's delete locks this row FOR UPDATE, so a batch never lands in
        a day while it is being checked and deleted, and sees the new horizon after it."""
        horizon = await conn.fetchval("SELECT horizon_ms FROM archive_horizon FOR SHARE")
        kept, refused = refuse_archived(batch, horizon or None)
        if refused:
            self.refused_archived_rows += refused
            log.warning(
                "minute_rows_refused reason=archived_day rows=%d horizon_ms=%d total=%d",
                refused,
                horizon,
                self.refused_archived_rows,
            )
        return kept

    async def _write(self, conn: Conn, batch: list[MinuteRow]) -> None:
        try:
            async with conn.transaction():  # a savepoint: a refused batch is split below
                status = await conn.execute(_UPSERT, *_columns(batch))
        except DATA_ERRORS as exc:
            if len(batch) == 1:
                self.rejected_rows += 1
                # The row is the useful part; a traceback of the split adds nothing.
                log.error(  # noqa: TRY400
                    "minute_row_rejected row=%r error=%s", batch[0], describe(exc)
                )
                return
            # Halving isolates k bad rows in O(k log n) statements instead of n.
            mid = len(batch) // 2
            await self._write(conn, batch[:mid])
            await self._write(conn, batch[mid:])
            return
        kept = len(batch) - _affected(status)
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
        exchanges = list(before)
        bounds = [before[e] for e in exchanges]
        start = None if since_ms is None else -(-since_ms // 60_000) * 60_000
        rec = await self._db.run(
            lambda conn: conn.fetchrow(_HISTORY, symbol, exchanges, bounds, start)
        )
        out = History(None)
        if rec is not None and rec[3]:
            agg = Aggregate(rec[0], rec[1], rec[2], rec[3], rec[4], rec[5])
            out = History(agg, rec[6], rec[7])
        if since_ms is not None and start is not None and start != since_ms:
            boundary = start - 60_000
            records = await self._db.run(
                lambda conn: conn.fetch(_AT, symbol, exchanges, bounds, boundary)
            )
            out.add_partial([_row(r) for r in records], since_ms // 1000)
        return out

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        """Rows whose minute starts at or after ``since_ms``, oldest first."""
        records = await self._db.run(lambda conn: conn.fetch(_SINCE, since_ms))
        return [_row(r) for r in records]

    async def newest_minute_ms(self) -> int | None:
        got: int | None = await self._db.run(
            lambda conn: conn.fetchval(
                "SELECT (extract(epoch FROM max(timestamp)) * 1000)::bigint FROM minute_prices"
            )
        )
        return got

    async def load_marks(self) -> dict[str, Mark]:
        records = await self._db.run(
            lambda conn: conn.fetch("SELECT source, position, made_ms FROM source_marks")
        )
        return {r[0]: (r[1], r[2]) for r in records}

    async def ping(self) -> bool:
        """True when a query round trip succeeds now."""
        return await self._db.ping()

    async def aclose(self) -> None:
        """Close the database when this store opened it; safe to call twice."""
        if self._owns_db:
            await self._db.aclose()


async def open_postgres(settings: PostgresSettings) -> PostgresMinuteStore:
    """A minute store on a database of its own (tools and tests; the daemon shares one
    ``Database`` between its stores). Raises StoreUnavailable when unreachable."""
    return PostgresMinuteStore(await open_database(settings), owns_db=True)
