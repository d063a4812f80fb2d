"""Embedded SQLite audit trail of captured FIX messages: the fallback when no PostgreSQL is
configured or reachable. Same contract and same row forms as postgres_store (raw as lossless
text, fields as the JSON array of parsed ["tag", "value"] pairs, receipt time as Unix ms), on
the shared SQLite plumbing (adapters/sqlite/database.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from marketflow.adapters.capture.listing import listing_filter
from marketflow.adapters.sqlite.database import SqliteDatabase, open_database
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

# Version 1 adopts a file made by an older version as it is (IF NOT EXISTS).
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE IF NOT EXISTS fix_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    peer TEXT NOT NULL,
    begin_string TEXT NOT NULL,
    msg_type TEXT NOT NULL,
    sender TEXT NOT NULL,
    target TEXT NOT NULL,
    seq_num INTEGER NOT NULL,
    symbol TEXT,
    raw TEXT NOT NULL,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fix_messages_msg_type_id ON fix_messages (msg_type, id);
CREATE INDEX IF NOT EXISTS fix_messages_symbol_id ON fix_messages (symbol, id);
CREATE INDEX IF NOT EXISTS fix_messages_received ON fix_messages (received_ms);
CREATE TABLE IF NOT EXISTS fix_rejects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    peer TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT NOT NULL
);
""",
    ),
)

_INSERT_MESSAGE = (
    "INSERT INTO fix_messages (received_ms, peer, begin_string, msg_type, sender, target,"
    " seq_num, symbol, raw, fields) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RAW = 8
# What sqlite3 raises for a row it refuses (OverflowError: an integer beyond 64 bits).
_REFUSED = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError)
_INSERT_REJECT = "INSERT INTO fix_rejects (received_ms, peer, reason, raw) VALUES (?, ?, ?, ?)"
_SELECT = (
    "SELECT id, received_ms, peer, raw, begin_string, msg_type, sender, target, seq_num, symbol,"
    " fields FROM fix_messages"
)


class SqliteCaptureStore(Closing):
    """CaptureStore on a local SQLite file; build with ``await SqliteCaptureStore.open(path)``."""

    kind = "sqlite"

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> SqliteCaptureStore:
        """Open (creating the file, its directory and the tables when missing)."""
        return cls(await open_database(path, MIGRATIONS))

    async def aclose(self) -> None:
        """Close the file (idempotent)."""
        await self._db.aclose()

    async def write(
        self, messages: Sequence[CapturedMessage], rejects: Sequence[CaptureReject]
    ) -> list[CaptureReject]:
        """Insert both in one transaction; a refused row is retried alone, then a reject."""
        rows = [
            (
                m.received_ms, m.peer, m.begin_string, m.msg_type, m.sender, m.target,
                m.seq_num, m.symbol, raw_to_text(m.raw), m.fields_json,
            )
            for m in messages
        ]  # fmt: skip
        bad = [(r.received_ms, r.peer, r.reason, raw_to_text(r.raw)) for r in rejects]

        def write(conn: sqlite3.Connection) -> list[CaptureReject]:
            try:
                conn.execute("BEGIN")  # one transaction: all rows or none
                try:
                    conn.executemany(_INSERT_MESSAGE, rows)
                    conn.executemany(_INSERT_REJECT, bad)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except _REFUSED:
                return _one_by_one(conn, messages, rows, bad)
            return []

        return await self._db.run(write)

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]:
        """Newest first, filtered, paged by ``before_id`` (keyset) or ``offset``."""
        where, args = listing_filter(query, ("received_ms", query.since_ms), lambda _: "?")
        sql = _SELECT + where
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        rows = await self._db.run(
            lambda c: c.execute(sql, (*args, query.limit, query.offset)).fetchall()
        )
        return [_message(r) for r in rows]

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """One message by id, or None."""
        rows = await self._db.run(
            lambda c: c.execute(_SELECT + " WHERE id = ?", (message_id,)).fetchall()
        )
        return _message(rows[0]) if rows else None

    async def list_rejects(self, limit: int, before_id: int | None) -> list[StoredReject]:
        """Newest first."""
        sql = "SELECT id, received_ms, peer, reason, raw FROM fix_rejects"
        sql += " WHERE ? IS NULL OR id < ? ORDER BY id DESC LIMIT ?"
        rows = await self._db.run(
            lambda c: c.execute(sql, (before_id, before_id, limit)).fetchall()
        )
        return [StoredReject(*r) for r in rows]

    async def count(self) -> tuple[int, int]:
        """(messages, rejects) stored."""
        sql = "SELECT (SELECT count(*) FROM fix_messages), (SELECT count(*) FROM fix_rejects)"
        row = await self._db.run(lambda c: c.execute(sql).fetchone())
        return int(row[0]), int(row[1])

    async def ping(self) -> bool:
        """True when a trivial query succeeds."""
        return await self._db.ping()


def _one_by_one(
    conn: sqlite3.Connection,
    messages: Sequence[CapturedMessage],
    rows: list[tuple[Any, ...]],
    bad: list[tuple[Any, ...]],
) -> list[CaptureReject]:
    refused: list[CaptureReject] = []
    for message, row in zip(messages, rows, strict=True):
        try:
            conn.execute(_INSERT_MESSAGE, row)
        except _REFUSED as exc:
            reason = f"store_refused: {exc}"
            refused.append(CaptureReject(message.received_ms, message.peer, reason, message.raw))
            bad.append((row[0], row[1], reason, row[_RAW]))
    for reject_row in bad:
        try:
            conn.execute(_INSERT_REJECT, reject_row)
        except _REFUSED:
            continue  # nothing left to fall back to for this row; keep the batch going
    return refused


def _message(r: Sequence[Any]) -> StoredMessage:
    fields = stored_fields(orjson.loads(r[10]))
    return StoredMessage(*r[:10], fields)  # type: ignore[call-arg]
