"""One contract for both minute stores: real PostgreSQL (harness server) and SQLite."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from marketflow.adapters.capture.postgres_store import PostgresCaptureStore
from marketflow.adapters.postgres import minute_store
from marketflow.adapters.postgres.minute_store import PostgresMinuteStore, open_postgres
from marketflow.adapters.sqlite.minute_store import SqliteMinuteStore, open_sqlite
from marketflow.domain.aggregates import MinuteRow
from marketflow.domain.capture import MessageQuery
from marketflow.domain.errors import StoreUnavailable
from marketflow.settings import PostgresSettings
from tests.harness.services import free_port

pytestmark = pytest.mark.integration

Store = PostgresMinuteStore | SqliteMinuteStore
M0 = 1_700_000_040_000  # a minute start (Unix ms)
MIN = 60_000


def row(
    minute: int = M0,
    exchange: str = "exchange1",
    symbol: str = "BTCUSDT",
    low: float = 100.0,
    high: float = 110.0,
    average: float = 105.0,
    count: int = 4,
) -> MinuteRow:
    return MinuteRow(exchange, symbol, minute, average, low, high, count)


def key(r: MinuteRow) -> tuple[str, str, int]:
    return r.key


@pytest.fixture
async def pg_store(pg_dsn: str) -> AsyncIterator[PostgresMinuteStore]:
    async with await open_postgres(PostgresSettings(dsn=pg_dsn)) as opened:
        yield opened


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteMinuteStore]:
    async with await open_sqlite(tmp_path / "marketflow.sqlite3") as opened:
        yield opened


@pytest.fixture(params=["pg_store", "sqlite_store"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each contract test runs once per store."""
    opened: Store = request.getfixturevalue(request.param)
    return opened


async def test_upsert_twice_keeps_one_row(store: Store) -> None:
    rows = [row(), row(exchange="exchange2")]
    await store.upsert_minutes(rows)
    await store.upsert_minutes(rows)
    assert sorted(await store.minutes_since(0), key=key) == sorted(rows, key=key)


async def test_upsert_overwrites_every_value(store: Store) -> None:
    await store.upsert_minutes([row()])
    newer = row(low=90.0, high=120.0, average=101.5, count=9)
    await store.upsert_minutes([newer])
    assert await store.minutes_since(0) == [newer]


async def test_duplicate_keys_in_one_batch_keep_the_last(store: Store) -> None:
    last = row(count=7)
    await store.upsert_minutes([row(count=1), last])
    assert await store.minutes_since(0) == [last]


async def test_minutes_since_returns_rows_from_that_minute_on_oldest_first(store: Store) -> None:
    rows = [row(minute=M0 + i * MIN) for i in (2, 0, 1)]
    await store.upsert_minutes(rows)
    got = await store.minutes_since(M0 + MIN)
    assert [r.minute_ms for r in got] == [M0 + MIN, M0 + 2 * MIN]


async def test_history_merges_rows_before_each_exchange_bound(store: Store) -> None:
    await store.upsert_minutes(
        [
            row(M0, "exchange1", low=100.0, high=110.0, average=105.0, count=2),
            row(M0 + MIN, "exchange1", low=90.0, high=100.0, average=95.0, count=2),
            # At exchange1's bound: excluded (the window holds that minute).
            row(M0 + 2 * MIN, "exchange1", low=1.0, high=999.0, average=500.0, count=100),
            row(M0, "exchange2", low=120.0, high=130.0, average=125.0, count=4),
            row(M0 + MIN, "exchange2", low=2.0, high=3.0, average=2.5, count=1),  # excluded
            row(M0, "exchange3", low=1.0, high=2.0, average=1.5, count=1),  # not asked for
            row(M0, "exchange1", symbol="ETHUSDT", low=1.0, high=2.0, average=1.5, count=1),
        ]
    )
    agg = (
        await store.history("BTCUSDT", {"exchange1": M0 + 2 * MIN, "exchange2": M0 + MIN})
    ).aggregate
    assert agg is not None
    assert (agg.low, agg.high, agg.count) == (90.0, 130.0, 8)
    assert agg.total == pytest.approx(105.0 * 2 + 95.0 * 2 + 125.0 * 4)


async def test_history_since_counts_the_straddling_minute_from_its_second_on(
    store: Store,
) -> None:
    s1 = (M0 + MIN) // 1000
    straddling = MinuteRow(
        "exchange1", "BTCUSDT", M0 + MIN, 101.0, 100.0, 102.0, 3, 60_000,
        ((s1 + 5, 100.0, 100.0, 100.0, 1), (s1 + 30, 101.0, 102.0, 203.0, 2)),
    )  # fmt: skip
    await store.upsert_minutes(
        [
            row(M0, low=100.0, high=100.0, average=100.0, count=1),
            straddling,
            row(M0 + 2 * MIN, low=103.0, high=103.0, average=103.0, count=1),
        ]
    )
    # From second 10 of minute M0+MIN: its seconds 30 (2 ticks) and minute M0+2MIN whole.
    got = await store.history("BTCUSDT", {"exchange1": M0 + 3 * MIN}, since_ms=(s1 + 10) * 1000)
    agg = got.aggregate
    assert agg is not None
    assert (agg.count, agg.low, agg.high) == (3, 101.0, 103.0)
    assert agg.total == pytest.approx(203.0 + 103.0)
    assert (agg.low_ms, agg.high_ms) == ((s1 + 30) * 1000, M0 + 2 * MIN)
    assert (got.minutes, got.incomplete_minutes) == (2, 1)  # the legacy row has no coverage
    # A minute-aligned start takes whole minutes only.
    whole = await store.history("BTCUSDT", {"exchange1": M0 + 3 * MIN}, since_ms=M0 + MIN)
    assert whole.aggregate is not None
    assert whole.aggregate.count == 4


async def test_history_timestamps_of_high_and_low_are_their_minutes(store: Store) -> None:
    await store.upsert_minutes(
        [row(M0, low=5.0, high=6.0, average=5.5), row(M0 + MIN, low=7.0, high=9.0, average=8.0)]
    )
    agg = (await store.history("BTCUSDT", {"exchange1": M0 + 3 * MIN})).aggregate
    assert agg is not None
    assert (agg.low_ms, agg.high_ms) == (M0, M0 + MIN)


async def test_a_stored_row_never_shrinks(store: Store) -> None:
    await store.upsert_minutes([row(M0, count=40)])
    await store.upsert_minutes([row(M0, count=21, average=1.0)])
    (got,) = await store.minutes_since(0)
    assert got.count == 40
    await store.upsert_minutes([row(M0, count=41, average=2.0)])
    (got,) = await store.minutes_since(0)
    assert (got.count, got.average) == (41, 2.0)


async def test_rows_keep_their_seconds_coverage_and_marks(store: Store) -> None:
    s0 = M0 // 1000
    r = MinuteRow(
        "exchange1", "BTCUSDT", M0, 1.5, 1.0, 2.0, 3, 12_345,
        ((s0, 1.0, 1.0, 1.0, 1), (s0 + 59, 1.0 / 3, 2.0, 3.5, 2)),
    )  # fmt: skip
    await store.upsert_minutes([r], {"fixvenue": (42, 1000)})
    await store.upsert_minutes([], {"fixvenue": (41, 999)})  # an older mark (a late spill)
    assert await store.minutes_since(0) == [r]
    assert await store.load_marks() == {"fixvenue": (42, 1000)}


async def test_history_without_rows_is_none(store: Store) -> None:
    await store.upsert_minutes([row(M0)])
    assert (await store.history("BTCUSDT", {"exchange1": M0})).aggregate is None
    assert (await store.history("DOGEUSDT", {"exchange1": M0 + MIN})).aggregate is None
    assert (await store.history("BTCUSDT", {})).aggregate is None


async def test_nan_row_is_rejected_and_the_rest_of_the_batch_is_written(store: Store) -> None:
    good = [row(M0 + i * MIN) for i in range(5)]
    bad = row(M0 + 9 * MIN, average=math.nan)
    await store.upsert_minutes([*good[:2], bad, *good[2:]])
    assert sorted(await store.minutes_since(0), key=key) == good
    assert store.rejected_rows == 1


async def test_infinite_or_non_positive_rows_are_rejected(store: Store) -> None:
    good = row()
    bads = [row(M0 + MIN, high=math.inf), row(M0 + 2 * MIN, low=0.0), row(M0 + 3 * MIN, count=0)]
    await store.upsert_minutes([*bads, good])
    assert await store.minutes_since(0) == [good]
    assert store.rejected_rows == 3


async def test_two_concurrent_writers_both_land(store: Store) -> None:
    async def writer(exchange: str) -> None:
        for i in range(20):
            await store.upsert_minutes([row(M0 + i * MIN, exchange=exchange, count=i + 1)])

    await asyncio.gather(writer("exchange1"), writer("exchange2"), store.minutes_since(0))
    got = await store.minutes_since(0)
    assert len(got) == 40
    assert {(r.exchange, r.count) for r in got} == {
        (e, i + 1) for e in ("exchange1", "exchange2") for i in range(20)
    }


async def test_closed_store_raises_store_unavailable_and_closes_twice(store: Store) -> None:
    await store.aclose()
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.upsert_minutes([row()])
    assert await store.ping() is False


async def test_ping_is_true_when_open(store: Store) -> None:
    assert await store.ping() is True


async def test_postgres_nul_byte_symbol_is_rejected_alone(pg_dsn: str) -> None:
    async with await open_postgres(PostgresSettings(dsn=pg_dsn)) as store:
        good = [row(M0), row(M0 + MIN)]
        await store.upsert_minutes([good[0], row(symbol="BAD\x00SYM"), good[1]])
        assert await store.minutes_since(0) == good
        assert store.rejected_rows == 1


async def test_postgres_batch_goes_in_statements_of_statement_rows_in_one_transaction(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(minute_store, "STATEMENT_ROWS", 2)
    async with await open_postgres(PostgresSettings(dsn=pg_dsn)) as store:
        statements: list[int] = []
        write = store._write

        async def counted(conn: object, batch: list[MinuteRow]) -> None:
            statements.append(len(batch))
            await write(conn, batch)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "_write", counted)
        good = [row(M0 + i * MIN) for i in range(4)]
        bad = row(M0 + 9 * MIN, average=math.nan)
        await store.upsert_minutes([*good[:2], bad, *good[2:]], {"feed": (7, 1)})
        assert statements == [2, 2, 1, 1, 1]  # the refused pair split in two, the last row
        assert sorted(await store.minutes_since(0), key=key) == good
        assert store.rejected_rows == 1
        assert await store.load_marks() == {"feed": (7, 1)}


async def test_postgres_schema_is_versioned_and_reopening_migrates_nothing(pg_dsn: str) -> None:
    first, second = await asyncio.gather(
        open_postgres(PostgresSettings(dsn=pg_dsn)), open_postgres(PostgresSettings(dsn=pg_dsn))
    )
    await first.aclose()
    await second.aclose()
    conn = await asyncpg.connect(pg_dsn)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        ts_type = await conn.fetchval(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'minute_prices' AND column_name = 'timestamp'"
        )
    finally:
        await conn.close()
    assert [v[0] for v in versions] == [1, 2, 3, 4, 5, 6]
    assert ts_type == "timestamp with time zone"


async def test_postgres_minute_is_stored_as_utc_minute_start(pg_dsn: str) -> None:
    async with await open_postgres(PostgresSettings(dsn=pg_dsn)) as store:
        await store.upsert_minutes([row(M0)])
    conn = await asyncpg.connect(pg_dsn)
    try:
        stored = await conn.fetchval("SELECT timestamp FROM minute_prices")
    finally:
        await conn.close()
    assert stored.timestamp() * 1000 == M0
    assert stored.second == 0


async def test_postgres_unreachable_at_open_raises_store_unavailable() -> None:
    settings = PostgresSettings(
        dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", connect_timeout_s=1.0
    )
    with pytest.raises(StoreUnavailable):
        await open_postgres(settings)


async def test_sqlite_unwritable_path_raises_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        await open_sqlite(blocker / "marketflow.sqlite3")


_CAPTURE_SCHEMA_725AC94 = """
SELECT pg_advisory_xact_lock(7354120);
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
"""
# ^ the audit trail's DDL exactly as commit 725ac94 ran it at every start (outside the
# numbered migrations), with the B-tree index that version had dropped again.


async def test_postgres_table_of_the_previous_version_upgrades_in_place(pg_dsn: str) -> None:
    from marketflow.adapters.postgres.migrations import MIGRATIONS

    conn = await asyncpg.connect(pg_dsn)
    try:  # the schema as versions 1-2 left it, with a row in it
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in MIGRATIONS[:2]:
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        await conn.execute(
            "INSERT INTO minute_prices VALUES ('BTCUSDT', 'exchange1', to_timestamp($1 / 1000.0),"
            " 105.0, 100.0, 110.0, 4)",
            M0,
        )
        async with conn.transaction():
            await conn.execute(_CAPTURE_SCHEMA_725AC94)
        await conn.execute(
            "INSERT INTO fix_messages (received_at, peer, begin_string, msg_type, sender, target,"
            " seq_num, symbol, raw, fields) VALUES (now(), 'p', 'FIX.4.2', 'D', 'A', 'B', 1,"
            " 'AAPL', 'raw', '[[\"35\", \"D\"]]')"
        )
    finally:
        await conn.close()
    async with await open_postgres(PostgresSettings(dsn=pg_dsn)) as store:
        assert await store.minutes_since(0) == [row()]  # covered_ms and seconds: None
        await store.upsert_minutes([row(count=3)])  # fewer ticks: the old row stays
        assert await store.minutes_since(0) == [row()]
    async with await PostgresCaptureStore.open(PostgresSettings(dsn=pg_dsn)) as capture:
        assert await capture.count() == (1, 0)
        (message,) = await capture.list_messages(MessageQuery(limit=10))
        assert (message.msg_type, message.symbol, message.raw) == ("D", "AAPL", "raw")


async def test_sqlite_file_of_the_previous_version_upgrades_in_place(tmp_path: Path) -> None:
    import sqlite3

    from marketflow.adapters.sqlite.minute_store import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
        " applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    for version, sql in MIGRATIONS[:2]:
        conn.execute(sql)
        conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
    conn.execute(
        "INSERT INTO minute_prices VALUES ('BTCUSDT', 'exchange1', ?, 105.0, 100.0, 110.0, 4)",
        (M0,),
    )
    conn.close()
    async with await open_sqlite(path) as store:
        assert await store.minutes_since(0) == [row()]
