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
- messages go in as one COPY in text format, one line per message built with one f-string
  (cheaper than asyncpg's per-record binary encoding; see the README's figures); a plain message
  (CapturedMessage.plain) needs no escaping at all;
- jsonb input is the database's largest per-row cost, so ``fields`` holds only the parsed
  pairs (tags as strings: smaller than numbers in jsonb, and no numeric parsing);
- indexes: the primary key (newest first, by id), (msg_type, id) and (symbol, id) for the
  API's filtered listings, and BRIN on ``received_at`` (rows arrive in time order, so a BRIN
  index of a few pages serves ``since``, where a B-tree costs more per row to keep up).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
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

_MESSAGE_COLUMNS = (
    "received_at", "peer", "begin_string", "msg_type", "sender", "target", "seq_num", "symbol",
    "raw", "fields",
)  # fmt: skip
_REJECT_COLUMNS = ("received_at", "peer", "reason", "raw")
_SELECT = (
    "SELECT id, (extract(epoch FROM received_at) * 1000)::bigint AS received_ms, peer, raw,"
    " begin_string, msg_type, sender, target, seq_num, symbol, fields"
    " FROM fix_messages"
)
# Refusals that are really "cannot reach the database now", not "refused this data".
_GONE = (*CONNECTION_ERRORS, *STALE_ERRORS)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


# COPY text format: backslash starts an escape, tab separates columns, newline ends a row.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL = "\\N"
_COPY_SLICE = 500  # messages per chunk of COPY data (about 270 KB)


def _esc(text: str) -> str:
    """``text`` as a COPY text-format value."""
    return text.translate(_COPY_ESCAPES)


def _copy_lines(messages: Sequence[CapturedMessage]) -> bytes:
    """The messages as COPY text-format rows in _MESSAGE_COLUMNS order."""
    # One receipt time and peer per read chunk: format each distinct pair once, not per row.
    heads: dict[tuple[int, str], str] = {}
    lines: list[str] = []
    append = lines.append
    null = _NULL
    for m in messages:
        key = (m.received_ms, m.peer)
        head = heads.get(key)
        if head is None:
            head = heads[key] = f"{_ts(m.received_ms).isoformat()}\t{_esc(m.peer)}\t"
        symbol = m.symbol
        if m.plain:  # nothing to escape in any column (see CapturedMessage.plain)
            append(
                f"{head}{m.begin_string}\t{m.msg_type}\t{m.sender}\t{m.target}\t{m.seq_num}\t"
                f"{null if symbol is None else symbol}\t{m.raw.decode()}\t{m.fields_json}\n"
            )
        else:
            append(
                f"{head}{_esc(m.begin_string)}\t{_esc(m.msg_type)}\t{_esc(m.sender)}\t"
                f"{_esc(m.target)}\t{m.seq_num}\t{null if symbol is None else _esc(symbol)}\t"
                f"{_esc(raw_to_text(m.raw))}\t{_esc(m.fields_json)}\n"
            )
    return "".join(lines).encode()


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
                return await self._one_by_one(conn, messages, list(bad))
            return []

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
        await conn.copy_to_table(
            "fix_messages", source=_chunks(messages), columns=_MESSAGE_COLUMNS, format="text"
        )
    if bad:
        await conn.copy_records_to_table("fix_rejects", records=bad, columns=_REJECT_COLUMNS)


async def _chunks(messages: Sequence[CapturedMessage]) -> AsyncIterator[bytes]:
    """The COPY data, formatted a slice at a time: asyncpg sends each slice as it comes, so the
    database parses and inserts one slice while this formats the next, instead of idling."""
    for i in range(0, len(messages), _COPY_SLICE):
        yield _copy_lines(messages[i : i + _COPY_SLICE])


def _message(r: asyncpg.Record) -> StoredMessage:
    return StoredMessage(
        r["id"], r["received_ms"], r["peer"], r["raw"], r["begin_string"], r["msg_type"],
        r["sender"], r["target"], r["seq_num"], r["symbol"],
        stored_fields(orjson.loads(r["fields"])),
    )  # fmt: skip
