"""The database side of the Parquet archive: which UTC days hold old rows, a day's rows in
one consistent snapshot, and the delete that checks it removes exactly what was archived.

Checksums are computed here in SQL with the same rule as domain/archive.py (first 8 bytes of
the MD5 of a key's text, summed modulo 2**64), plus a content checksum over each row's whole
text (``md5(row::text)``), which only the database computes: the export's and the delete's
are compared, so a row changed since the export (same key, new values) aborts the delete.

The delete is ONE statement, ``WITH d AS (DELETE ... RETURNING hashes) SELECT count, sums``,
in a transaction that is rolled back unless the numbers equal the manifest's: the rows checked
are exactly the rows deleted, whatever committed meanwhile. For minute rows the transaction
first locks the ``archive_horizon`` row, which every minute write takes FOR SHARE (see
minute_store.py), so no minute write runs during the check and the delete, and every write
after it sees the new horizon and refuses a row of an archived day.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from marketflow.adapters.postgres.database import Database
from marketflow.domain.archive import (
    CAPTURE_TABLE,
    DAY_MS,
    MINUTE_TABLE,
    DayChecks,
    checksum,
    minute_key_text,
)

if TYPE_CHECKING:
    from marketflow.adapters.postgres.database import Conn

_MOD = 1 << 64
CHUNK_ROWS = 50_000  # rows per fetch and per Parquet row group: bounded memory per day


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    time_sql: str  # the row's time as a timestamptz column
    time_ms_sql: str  # the same as Unix ms (bigint)
    key_sql: str  # the key's text, as domain.archive.key texts
    select_sql: str  # the exported columns, named as the Parquet schema's
    order_sql: str
    horizon: bool  # rows of an archived day are refused at write (minute rows)

    def key_hash(self, alias: str) -> str:
        key = self.key_sql.format(t=alias)
        return f"('x' || substr(md5({key}), 1, 16))::bit(64)::bigint"


_MINUTE_MS = "(extract(epoch FROM {t}.timestamp) * 1000)::bigint"
TABLES: dict[str, _Table] = {
    MINUTE_TABLE: _Table(
        MINUTE_TABLE,
        "timestamp",
        _MINUTE_MS,
        "{t}.exchange || E'\\x1f' || {t}.pair_name || E'\\x1f' || " + _MINUTE_MS + "::text",
        "t.exchange, t.pair_name, " + _MINUTE_MS.format(t="t") + " AS minute_ms,"
        " t.average_price, t.min_price, t.max_price, t.tick_count, t.covered_ms, t.seconds",
        "t.exchange, t.pair_name, t.timestamp",
        horizon=True,
    ),
    CAPTURE_TABLE: _Table(
        CAPTURE_TABLE,
        "received_at",
        "(extract(epoch FROM {t}.received_at) * 1000)::bigint",
        "{t}.id::text",
        "t.id, (extract(epoch FROM t.received_at) * 1000000)::bigint AS received_us, t.peer,"
        " t.begin_string, t.msg_type, t.sender, t.target, t.seq_num, t.symbol, t.raw,"
        " t.fields::text AS fields",
        "t.id",
        horizon=False,
    ),
}

# Column chunks (name -> values) handed to the file writer as they are read.
Sink = Callable[[dict[str, list[Any]]], Awaitable[None]]


class ExportMismatch(RuntimeError):
    """The keys read and the database's own key checksum disagree (a bug, not a race)."""


class ArchiveSource:
    """Old rows of the minute and FIX audit tables, on the daemon's shared ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def days_before(self, table: str, before_ms: int) -> dict[int, int]:
        """Row count per UTC day (day start, Unix ms) of rows older than ``before_ms``."""
        t = TABLES[table]
        sql = (
            f"SELECT floor(extract(epoch FROM t.{t.time_sql}) / 86400)::bigint * {DAY_MS},"  # noqa: S608
            f" count(*) FROM {t.name} t"
            f" WHERE t.{t.time_sql} < to_timestamp($1::bigint / 1000.0) GROUP BY 1"
        )
        records = await self._db.run(lambda conn: conn.fetch(sql, before_ms))
        return {int(r[0]): int(r[1]) for r in records}

    def _checks_sql(self, t: _Table) -> str:
        return (
            f"SELECT count(*), coalesce(sum({t.key_hash('t')}::numeric), 0),"  # noqa: S608
            " coalesce(sum(('x' || substr(md5(t::text), 1, 16))::bit(64)::bigint::numeric), 0),"
            f" min({t.time_ms_sql.format(t='t')}), max({t.time_ms_sql.format(t='t')})"
            f" FROM {t.name} t WHERE {_RANGE.format(col='t.' + t.time_sql)}"
        )

    async def export_day(self, table: str, day_ms: int, sink: Sink) -> DayChecks:
        """Hand the day's rows to ``sink`` in chunks, from one REPEATABLE READ snapshot, and
        return the snapshot's checks (the key checksum is also recomputed from the rows)."""
        t = TABLES[table]
        select = (
            f"SELECT {t.select_sql} FROM {t.name} t"  # noqa: S608
            f" WHERE {_RANGE.format(col='t.' + t.time_sql)} ORDER BY {t.order_sql}"
        )
        key_of = _minute_key if table == MINUTE_TABLE else _capture_key

        async def op(conn: Conn) -> DayChecks:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rec = await conn.fetchrow(self._checks_sql(t), day_ms, day_ms + DAY_MS)
                assert rec is not None
                checks = DayChecks(
                    int(rec[0]), int(rec[1]) % _MOD, int(rec[2]) % _MOD, rec[3], rec[4]
                )
                rows = total = 0  # the key checksum of the rows read, chunk by chunk
                cursor = await conn.cursor(select, day_ms, day_ms + DAY_MS)
                while records := await cursor.fetch(CHUNK_ROWS):
                    names = list(records[0].keys())
                    columns = {n: [r[i] for r in records] for i, n in enumerate(names)}
                    n, part = checksum(key_of(columns))
                    rows, total = rows + n, (total + part) % _MOD
                    await sink(columns)
            if (rows, total) != (checks.rows, checks.key_checksum):
                msg = f"{table} day {day_ms}: rows read do not match the database's key checksum"
                raise ExportMismatch(msg)
            return checks

        return await self._db.run(op)

    async def delete_day(self, table: str, day_ms: int, expected: DayChecks) -> DayChecks:
        """Delete the day's rows if they are exactly ``expected`` (count, key and content
        checksums); otherwise delete nothing. Returns what the rows were (equal to
        ``expected`` when deleted). Zero rows found is a delete done already: committed, so
        that the horizon is set."""
        t = TABLES[table]
        sql = (
            f"WITH d AS (DELETE FROM {t.name} t"  # noqa: S608
            f" WHERE {_RANGE.format(col='t.' + t.time_sql)}"
            f" RETURNING {t.key_hash('t')} AS k,"
            " ('x' || substr(md5(t::text), 1, 16))::bit(64)::bigint AS c)"
            " SELECT count(*), coalesce(sum(k::numeric), 0), coalesce(sum(c::numeric), 0) FROM d"
        )

        async def op(conn: Conn) -> DayChecks:
            tx = conn.transaction()
            await tx.start()
            try:
                if t.horizon:
                    await conn.execute("SELECT horizon_ms FROM archive_horizon FOR UPDATE")
                rec = await conn.fetchrow(sql, day_ms, day_ms + DAY_MS)
                assert rec is not None
                found = DayChecks(int(rec[0]), int(rec[1]) % _MOD, int(rec[2]) % _MOD)
                same = (found.rows, found.key_checksum, found.content_checksum) == (
                    expected.rows,
                    expected.key_checksum,
                    expected.content_checksum,
                )
                if not (same or found.rows == 0):
                    await tx.rollback()
                    return found
                if t.horizon:
                    await conn.execute(
                        "UPDATE archive_horizon SET horizon_ms = GREATEST(horizon_ms, $1)",
                        day_ms + DAY_MS,
                    )
            except BaseException:
                await tx.rollback()
                raise
            await tx.commit()
            return found

        return await self._db.run(op)

    async def horizon_ms(self) -> int:
        """Minute rows starting before this are archived (0: nothing archived yet)."""
        got = await self._db.run(
            lambda conn: conn.fetchval("SELECT horizon_ms FROM archive_horizon")
        )
        return int(got or 0)


_RANGE = "{col} >= to_timestamp($1::bigint / 1000.0) AND {col} < to_timestamp($2::bigint / 1000.0)"


def _minute_key(columns: dict[str, list[Any]]) -> list[str]:
    return [
        minute_key_text(e, p, m)
        for e, p, m in zip(
            columns["exchange"], columns["pair_name"], columns["minute_ms"], strict=True
        )
    ]


def _capture_key(columns: dict[str, list[Any]]) -> list[str]:
    return [str(i) for i in columns["id"]]
