"""SQLite plumbing shared by the embedded stores: one connection per file, in WAL mode,
driven from worker threads (``asyncio.to_thread``) one call at a time, the file's numbered
migrations, and one translation of "the file is unusable now" into ``StoreUnavailable``.

Two locks: the asyncio lock serialises callers; the thread lock keeps the next call off the
connection while the thread of a cancelled caller (which released the asyncio lock) still
runs on it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from marketflow.domain.errors import StoreUnavailable

log = logging.getLogger("marketflow.sqlite")

T = TypeVar("T")

Migrations = Sequence[tuple[int, str]]
"""Numbered, append-only SQL scripts (statements separated by ``;``)."""

# The file is unusable now (locked, disk full, I/O error, deleted directory).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    sqlite3.DatabaseError,
    OSError,
)


class SqliteDatabase:
    """One SQLite file; ``run(fn)`` calls ``fn(connection)`` in a worker thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path, identity: str) -> None:
        self._conn = conn
        self.path = path
        self.identity = identity
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._closed = False

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            if self._closed:
                raise StoreUnavailable(f"sqlite {self.path}: store is closed")
            try:
                return await asyncio.to_thread(self._locked, fn)
            except UNAVAILABLE_ERRORS as exc:
                raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._thread_lock:
            return fn(self._conn)

    async def ping(self) -> bool:
        try:
            await self.run(lambda c: c.execute("SELECT 1").fetchone())
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


def migrate(conn: sqlite3.Connection, migrations: Migrations) -> list[int]:
    """Apply the migrations this file lacks, in order; returns the versions applied."""
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
        for version, sql in migrations:
            if version > current:
                for statement in sql.split(";"):  # execute() takes one statement
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
                applied.append(version)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS marketflow_instance ("
            " one INTEGER PRIMARY KEY CHECK (one = 1), id TEXT NOT NULL)"
        )
        conn.execute(
            "INSERT INTO marketflow_instance (one, id) VALUES (1, ?) ON CONFLICT DO NOTHING",
            (uuid.uuid4().hex,),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


def _open(path: Path, migrations: Migrations) -> tuple[sqlite3.Connection, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (BEGIN ... COMMIT), nothing implicit.
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        applied = migrate(conn, migrations)
        (got,) = conn.execute("SELECT id FROM marketflow_instance").fetchone()
    except BaseException:
        conn.close()
        raise
    if applied:
        log.info("sqlite_migrated path=%s versions=%s", path, applied)
    return conn, f"sqlite-{str(got)[:16]}"


async def open_database(path: Path, migrations: Migrations) -> SqliteDatabase:
    """Open (creating if needed) the file at ``path`` and bring its schema up to date.

    Raises StoreUnavailable when the file cannot be opened or written.
    """
    try:
        conn, identity = await asyncio.to_thread(_open, path, migrations)
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"sqlite {path}: {exc}") from exc
    return SqliteDatabase(conn, path, identity)
