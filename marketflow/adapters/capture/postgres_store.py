"""PostgreSQL audit trail of captured FIX messages (asyncpg, bulk COPY).

Tables ``fix_messages`` and ``fix_rejects`` come from the shared migrations
(adapters/postgres/migrations.py), on the daemon's one pool. Batches go in with COPY (details
below). When
PostgreSQL refuses a batch for its data (not for being unreachable), the rows are retried one
by one so that a single bad row costs only itself: it is written to ``fix_rejects`` with the
database's reason. ``raw`` is the lossless text form of domain.capture.raw_to_text; ``fields``
is the jsonb array of parsed ``["tag", "value"]`` pairs (names and meanings are added at read
time from the static dictionary, see domain.capture).

Write cost is what limits the capture rate, on both sides of the socket:
- messages go in as one binary COPY per batch (asyncpg ``copy_records_to_table`` of the rows of
  ``message_records``): asyncpg encodes the whole batch without yielding to the event loop, so
  the database gets it at once instead of slice by slice between the listener's reads, and it
  parses no timestamps and no text escapes. A seq_num bigint cannot hold is refused before the
  COPY (asyncpg would fail while encoding, in this process);
- jsonb input is the database's largest per-row cost, so ``fields`` holds only the parsed
  pairs (tags as strings: smaller than numbers in jsonb, and no numeric parsing);
- indexes: the primary key (newest first, by id), (msg_type, id) and (symbol, id) for the
  API's filtered listings, and BRIN on ``received_at`` (rows arrive in time order, so a BRIN
  index of a few pages serves ``since``, where a B-tree costs more per row to keep up).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from marketflow.adapters.capture.listing import listing_filter
from marketflow.adapters.postgres.database import (
    CONNECTION_ERRORS,
    STALE_ERRORS,
    Database,
    open_database,
)
from marketflow.domain.capture import (
    CapturedMessage,
    CaptureReject,
    MessageQuery,
    StoredMessage,
    StoredReject,
    raw_to_text,
    stored_fields,
)
from marketflow.lifecycle import Closing
from marketflow.settings import PostgresSettings

MESSAGE_COLUMNS = (
    "received_at", "peer", "begin_string", "msg_type", "sender", "target", "seq_num", "symbol",
    "raw", "fields",
)  # fmt: skip
_REJECT_COLUMNS = ("received_at", "peer", "reason", "raw")
_SELECT = (
    "SELECT id, (extract(epoch FROM received_at) * 1000)::bigint AS received_ms, peer, raw,"
    " begin_string, msg_type, sender, target, seq_num, symbol, fields"
    " FROM fix_messages"
)
_BIGINT_MIN, _BIGINT_MAX = -(2**63), 2**63 - 1
# Refusals that are really "cannot reach the database now", not "refused this data".
_GONE = (*CONNECTION_ERRORS, *STALE_ERRORS)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def message_records(messages: Sequence[CapturedMessage]) -> list[tuple[Any, ...]]:
    """The messages as the column values the store writes, in MESSAGE_COLUMNS order (what
    bench.fix copies to measure PostgreSQL's own ceiling)."""
    ts = {ms: _ts(ms) for ms in {m.received_ms for m in messages}}
    return [
        (
            ts[m.received_ms], m.peer, m.begin_string, m.msg_type, m.sender, m.target,
            m.seq_num, m.symbol, m.raw.decode() if m.plain else raw_to_text(m.raw), m.fields_json,
        )
        for m in messages
    ]  # fmt: skip


class PostgresCaptureStore(Closing):
    """CaptureStore on PostgreSQL; build with ``await PostgresCaptureStore.open(settings)``."""

    kind = "postgres"

    def __init__(self, db: Database, *, owns_db: bool = False) -> None:
        self._db = db
        self._owns_db = owns_db

    @classmethod
    async def open(cls, settings: PostgresSettings) -> PostgresCaptureStore:
        """A capture store on a database of its own (tools and benchmarks; the daemon shares
        its one Database); raises StoreUnavailable when unreachable."""
        return cls(await open_database(settings), owns_db=True)

    async def aclose(self) -> None:
        """Close the database when this store opened it (idempotent)."""
        if self._owns_db:
            await self._db.aclose()

    async def write(
        self, messages: Sequence[CapturedMessage], rejects: Sequence[CaptureReject]
    ) -> list[CaptureReject]:
        """COPY both; a refused row is retried alone and, if refused again, becomes a reject."""
        ts = {ms: _ts(ms) for ms in {r.received_ms for r in rejects}}
        bad = [(ts[r.received_ms], r.peer, r.reason, raw_to_text(r.raw)) for r in rejects]
        # What bigint cannot hold would fail while asyncpg encodes the binary COPY, in this
        # process: refused here, as the database would refuse it.
        unfit: list[CaptureReject] = []
        if not all(_BIGINT_MIN <= m.seq_num <= _BIGINT_MAX for m in messages):
            fit = [m for m in messages if _BIGINT_MIN <= m.seq_num <= _BIGINT_MAX]
            for m in messages:
                if not _BIGINT_MIN <= m.seq_num <= _BIGINT_MAX:
                    reason = f"store_refused: seq_num {m.seq_num} is out of range for bigint"
                    unfit.append(CaptureReject(m.received_ms, m.peer, reason, m.raw))
                    bad.append((_ts(m.received_ms), m.peer, reason, raw_to_text(m.raw)))
            messages = fit

        async def op(conn: PoolConnectionProxy[Any]) -> list[CaptureReject]:
            try:
                if messages and bad:
                    async with conn.transaction():
                        await _copy(conn, messages, bad)
                else:  # one COPY is atomic on its own: no BEGIN/COMMIT round trips
                    await _copy(conn, messages, bad)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _GONE):
                    raise
                return unfit + await self._one_by_one(conn, messages, list(bad))
            return unfit

        return await self._db.run(op)  # type: ignore[arg-type]

    async def _one_by_one(
        self,
        conn: PoolConnectionProxy[Any],
        messages: Sequence[CapturedMessage],
        bad: list[tuple[Any, ...]],
    ) -> list[CaptureReject]:
        refused: list[CaptureReject] = []
        for message in messages:
            try:
                await _copy(conn, [message], [])
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _GONE):
                    raise
                reason = f"store_refused: {exc}"
                refused.append(
                    CaptureReject(message.received_ms, message.peer, reason, message.raw)
                )
                bad.append(
                    (_ts(message.received_ms), message.peer, reason, raw_to_text(message.raw))
                )
        for reject_row in bad:
            try:
                await conn.copy_records_to_table(
                    "fix_rejects", records=[reject_row], columns=_REJECT_COLUMNS
                )
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _GONE):
                    raise
                # Nothing left to fall back to for this row: keep the batch going.
                continue
        return refused

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]:
        """Newest first, filtered, paged by ``before_id`` (keyset) or ``offset``."""
        since = None if query.since_ms is None else _ts(query.since_ms)
        where, args = listing_filter(query, ("received_at", since), lambda n: f"${n}")
        sql = _SELECT + where
        args += [query.limit, query.offset]
        sql += f" ORDER BY id DESC LIMIT ${len(args) - 1} OFFSET ${len(args)}"
        return [_message(r) for r in await self._fetch(sql, *args)]

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """One message by id, or None."""
        rows = await self._fetch(_SELECT + " WHERE id = $1", message_id)
        return _message(rows[0]) if rows else None

    async def list_rejects(self, limit: int, before_id: int | None) -> list[StoredReject]:
        """Newest first."""
        rows = await self._fetch(
            "SELECT id, received_at, peer, reason, raw FROM fix_rejects"
            " WHERE $1::bigint IS NULL OR id < $1 ORDER BY id DESC LIMIT $2",
            before_id,
            limit,
        )
        return [
            StoredReject(r["id"], _ms(r["received_at"]), r["peer"], r["reason"], r["raw"])
            for r in rows
        ]

    async def count(self) -> tuple[int, int]:
        """(messages, rejects) stored."""
        rows = await self._fetch(
            "SELECT (SELECT count(*) FROM fix_messages), (SELECT count(*) FROM fix_rejects)"
        )
        return int(rows[0][0]), int(rows[0][1])

    async def ping(self) -> bool:
        """True when a trivial query succeeds."""
        return await self._db.ping()

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return list(await self._db.run(lambda conn: conn.fetch(sql, *args)))


async def _copy(
    conn: PoolConnectionProxy[Any], messages: Sequence[CapturedMessage], bad: list[Any]
) -> None:
    if messages:
        # Binary COPY, encoded by asyncpg in one go (no await between rows): the database gets
        # the whole batch at once, and parses no timestamps and no COPY text escapes.
        await conn.copy_records_to_table(
            "fix_messages", records=message_records(messages), columns=MESSAGE_COLUMNS
        )
    if bad:
        await conn.copy_records_to_table("fix_rejects", records=bad, columns=_REJECT_COLUMNS)


def _message(r: asyncpg.Record) -> StoredMessage:
    return StoredMessage(
        r["id"], r["received_ms"], r["peer"], r["raw"], r["begin_string"], r["msg_type"],
        r["sender"], r["target"], r["seq_num"], r["symbol"],
        stored_fields(orjson.loads(r["fields"])),
    )  # fmt: skip
