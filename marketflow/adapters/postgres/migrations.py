"""Every table marketflow keeps in PostgreSQL, as numbered migrations applied in order by one
runner under one advisory lock (two daemons starting together do not race).

Append-only: a released migration is never edited. A database made by an older version
upgrades in place: versions 1-2 are the minute table as first released, 3 adds coverage,
per-second parts and marks, 4 adopts the FIX audit trail tables, which older versions created
outside the numbering (``IF NOT EXISTS``: existing tables and rows are kept), 5 adds the
pipeline diagnostics.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import asyncpg

log = logging.getLogger("marketflow.postgres")

_LOCK_ID = 0x6D666C6F  # advisory lock serialising concurrent migrations ("mflo")

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE minute_prices (
            pair_name text NOT NULL,
            exchange text NOT NULL,
            timestamp timestamptz NOT NULL,
            average_price double precision NOT NULL,
            min_price double precision NOT NULL,
            max_price double precision NOT NULL,
            tick_count bigint NOT NULL,
            PRIMARY KEY (exchange, pair_name, timestamp),
            -- 'Infinity' bounds also reject NaN (PostgreSQL sorts NaN above every number).
            CONSTRAINT minute_prices_valid CHECK (
                tick_count > 0
                AND min_price > 0 AND min_price < 'Infinity'
                AND max_price > 0 AND max_price < 'Infinity'
                AND average_price > 0 AND average_price < 'Infinity'
                AND min_price <= max_price
            )
        )
        """,
    ),
    # minutes_since() scans by time across every exchange and pair.
    (2, "CREATE INDEX minute_prices_timestamp_idx ON minute_prices (timestamp)"),
    (
        3,
        """
        ALTER TABLE minute_prices
            ADD COLUMN covered_ms integer
                CONSTRAINT minute_prices_covered CHECK (covered_ms BETWEEN 0 AND 60000),
            ADD COLUMN seconds bytea;
        CREATE TABLE source_marks (
            source text PRIMARY KEY,
            position bigint NOT NULL,
            made_ms bigint NOT NULL
        );
        CREATE TABLE marketflow_instance (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            id text NOT NULL
        );
        """,
    ),
    (
        4,
        """
        CREATE TABLE IF NOT EXISTS fix_messages (
            id bigserial PRIMARY KEY,
            received_at timestamptz NOT NULL,
            peer text NOT NULL,
            begin_string text NOT NULL,
            msg_type text NOT NULL,
            sender text NOT NULL,
            target text NOT NULL,
            seq_num bigint NOT NULL,
            symbol text,
            raw text NOT NULL,
            fields jsonb NOT NULL
        );
        CREATE INDEX IF NOT EXISTS fix_messages_msg_type_id ON fix_messages (msg_type, id);
        CREATE INDEX IF NOT EXISTS fix_messages_symbol_id ON fix_messages (symbol, id);
        -- Versions before BRIN had a B-tree here (dearer per row to keep up): replaced.
        DROP INDEX IF EXISTS fix_messages_received_at;
        -- BRIN summarises a block range only once it is full and autovacuum gets to it: without
        -- autosummarize, only VACUUM would, and every unsummarised range matches every ``since``.
        CREATE INDEX IF NOT EXISTS fix_messages_received_at_brin ON fix_messages
            USING brin (received_at) WITH (autosummarize = on);
        ALTER INDEX fix_messages_received_at_brin SET (autosummarize = on);
        CREATE TABLE IF NOT EXISTS fix_rejects (
            id bigserial PRIMARY KEY,
            received_at timestamptz NOT NULL,
            peer text NOT NULL,
            reason text NOT NULL,
            raw text NOT NULL
        );
        """,
    ),
    # The Parquet archive (adapters/postgres/archive_source.py): minute rows starting before
    # horizon_ms are in the archive and deleted here; a write of one is refused.
    (
        5,
        """
        CREATE TABLE archive_horizon (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            horizon_ms bigint NOT NULL
        );
        INSERT INTO archive_horizon (horizon_ms) VALUES (0);
        """,
    ),
    # -- pipeline diagnostics (issue 14): one row per node and minute (pipeline_stats.py)
    (
        6,
        """
        CREATE TABLE pipeline_stats (
            node_id text NOT NULL,
            minute timestamptz NOT NULL,
            role text NOT NULL,
            ticks_in bigint NOT NULL,
            ticks_out bigint NOT NULL,
            rejects jsonb NOT NULL,
            reconnects bigint NOT NULL,
            lag_by_partition jsonb NOT NULL,
            queue_depths jsonb NOT NULL,
            write_count integer NOT NULL,
            write_p50_ms double precision NOT NULL,
            write_p99_ms double precision NOT NULL,
            written_at timestamptz NOT NULL,
            PRIMARY KEY (node_id, minute)
        );
        -- GET /diagnostics without a node: the newest rows of every node.
        CREATE INDEX pipeline_stats_minute_idx ON pipeline_stats (minute);
        """,
    ),
)


async def migrate(conn: Conn) -> list[int]:
    """Apply the migrations this database lacks, in order; returns the versions applied."""
    applied: list[int] = []
    async with conn.transaction():
        # Two daemons starting together must not both create the same table.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        for version, sql in MIGRATIONS:
            if version <= current:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    if applied:
        log.info("postgres_migrated versions=%s", applied)
    return applied
