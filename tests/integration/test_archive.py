"""The Parquet archive against a real PostgreSQL: round trip with unchanged history answers,
a failed read-back or a changed row deleting nothing, idempotent re-runs, late rows refused."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import asyncpg
import pyarrow.parquet as pq
import pytest

from marketflow.adapters.archive.history import ArchivedMinuteStore, ArchiveReader
from marketflow.adapters.archive.parquet import ParquetArchive
from marketflow.adapters.postgres.archive_source import ArchiveSource
from marketflow.adapters.postgres.database import Database, open_database
from marketflow.adapters.postgres.minute_store import PostgresMinuteStore
from marketflow.adapters.spill_file import JsonlSpillFile
from marketflow.app.aggregator import Aggregator
from marketflow.app.archive import AfterWrite, Archiver, DayResult, exit_code
from marketflow.app.minute_writer import MinuteWriter
from marketflow.app.queries import PriceQueries, StatAnswer
from marketflow.domain.aggregates import MinuteRow
from marketflow.domain.archive import CAPTURE_TABLE, DAY_MS, MINUTE_TABLE
from marketflow.domain.window import PairWindow
from marketflow.settings import PostgresSettings

pytestmark = pytest.mark.integration

D = 19_675 * DAY_MS  # a UTC day start: "today" in these tests
NOW = D + 12 * 3_600_000
OLDER_THAN_S = 12 * 3600  # cut-off D: days D-2 and D-1 are archived, D stays
EXCHANGES = ("ex1", "ex2")
PAIRS = ("BTCUSDT", "ETHUSDT")


def seconds(minute_ms: int, base: float) -> tuple[tuple[int, float, float, float, int], ...]:
    s0 = minute_ms // 1000
    return tuple((s0 + i * 10, base + i, base + i, base + i, 1) for i in range(6))


def seed_rows() -> list[MinuteRow]:
    rows: list[MinuteRow] = []
    for day in (D - 2 * DAY_MS, D - DAY_MS, D):
        for e, ex in enumerate(EXCHANGES):
            for p, pair in enumerate(PAIRS):
                for k in range(0, 1440, 97):  # minutes spread over the day
                    minute = day + k * 60_000
                    base = 100.0 + (day // DAY_MS % 7) * 3 + e + p * 50 + k % 13
                    secs = seconds(minute, base)
                    total = sum(x[3] for x in secs)
                    covered = 60_000 if k % 3 else 45_000
                    rows.append(
                        MinuteRow(ex, pair, minute, total / 6, base, base + 5, 6, covered, secs)
                    )
    return rows


class NoWindows:
    """An aggregator holding nothing: every answer comes from the store (and the archive)."""

    def window(self, exchange: str, symbol: str) -> PairWindow | None:
        return None

    def covered_ms(self, exchange: str, minute_ms: int) -> int:
        return 0


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Database]:
    opened = await open_database(PostgresSettings(dsn=pg_dsn))
    yield opened
    await opened.aclose()


async def seed(db: Database) -> None:
    await PostgresMinuteStore(db).upsert_minutes(seed_rows())

    async def capture(conn: asyncpg.Connection) -> None:
        for day in (D - 2 * DAY_MS, D - DAY_MS, D):
            for i in range(5):
                await conn.execute(
                    "INSERT INTO fix_messages (received_at, peer, begin_string, msg_type,"
                    " sender, target, seq_num, symbol, raw, fields) VALUES"
                    " (to_timestamp($1::bigint / 1000000.0), 'p', 'FIX.4.4', 'W', 'A', 'B', $2,"
                    " 'BTCUSDT', $3, '[[\"35\", \"W\"]]')",
                    (day + i * 3_600_000) * 1000 + 123,
                    i + 1,
                    f"8=FIX.4.4|35=W|34={i + 1}|",
                )

    await db.run(capture)  # type: ignore[arg-type]


def archiver(db: Database, out: Path, after_write: AfterWrite | None = None) -> Archiver:
    return Archiver(
        ArchiveSource(db), ParquetArchive(out), OLDER_THAN_S, lambda: NOW, after_write=after_write
    )


async def count(db: Database, table: str, before_ms: int = D) -> int:
    column = "timestamp" if table == MINUTE_TABLE else "received_at"
    sql = f"SELECT count(*) FROM {table} WHERE {column} < to_timestamp($1 / 1000.0)"  # noqa: S608
    got: int = await db.run(lambda conn: conn.fetchval(sql, before_ms))
    return got


def answers(db: Database, out: Path) -> PriceQueries:
    store = ArchivedMinuteStore(PostgresMinuteStore(db), ArchiveReader(out))
    return PriceQueries(
        cast(Aggregator, NoWindows()),
        lambda: store,
        lambda: list(EXCHANGES),
        lambda: list(EXCHANGES),
        list(PAIRS),
        lambda: NOW,
    )


async def all_answers(q: PriceQueries) -> list[StatAnswer]:
    out = []
    for pair in PAIRS:
        for ex in (None, *EXCHANGES):
            for stat in ("highest", "lowest", "average"):
                out.append(await q.stat(stat, pair, ex, None, "all"))
            # A period starting inside an archived day, off a minute boundary: the cut day
            # is read from its file, the straddling minute (a seeded one) counts its seconds.
            period_s = (NOW - (D - DAY_MS + 291 * 60_000 + 17_000)) // 1000
            out.append(await q.stat("average", pair, ex, period_s, "p"))
    return out


def same(before: list[StatAnswer], after: list[StatAnswer]) -> None:
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        assert (a.stat, a.symbol, a.exchange, a.count, a.timestamp_ms) == (
            b.stat,
            b.symbol,
            b.exchange,
            b.count,
            b.timestamp_ms,
        )
        assert a.incomplete_minutes == b.incomplete_minutes
        assert a.price == pytest.approx(b.price, rel=1e-12)


async def test_round_trip_archives_verifies_deletes_and_keeps_history_answers(
    db: Database, tmp_path: Path
) -> None:
    await seed(db)
    before = await all_answers(answers(db, tmp_path))
    minute_rows_old = await count(db, MINUTE_TABLE)
    capture_rows_old = await count(db, CAPTURE_TABLE)
    kept_today = await count(db, MINUTE_TABLE, D + DAY_MS)

    results = await archiver(db, tmp_path).run()

    assert exit_code(results) == 0
    assert [(r.table, r.day, r.status, r.action) for r in results] == [
        (MINUTE_TABLE, "2023-11-12", "ok", "exported+deleted"),
        (MINUTE_TABLE, "2023-11-13", "ok", "exported+deleted"),
        (CAPTURE_TABLE, "2023-11-12", "ok", "exported+deleted"),
        (CAPTURE_TABLE, "2023-11-13", "ok", "exported+deleted"),
    ]
    assert sum(r.rows for r in results if r.table == MINUTE_TABLE) == minute_rows_old
    assert sum(r.rows for r in results if r.table == CAPTURE_TABLE) == capture_rows_old == 10
    assert await count(db, MINUTE_TABLE) == 0
    assert await count(db, CAPTURE_TABLE) == 0
    assert await count(db, MINUTE_TABLE, D + DAY_MS) == kept_today - minute_rows_old
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {(f["table"], f["day"], f["state"]) for f in manifest["files"]} == {
        (MINUTE_TABLE, "2023-11-12", "archived"),
        (MINUTE_TABLE, "2023-11-13", "archived"),
        (CAPTURE_TABLE, "2023-11-12", "archived"),
        (CAPTURE_TABLE, "2023-11-13", "archived"),
    }
    for f in manifest["files"]:
        assert pq.read_metadata(tmp_path / f["file"]).num_rows == f["rows"]
        assert f["schema_version"] == 1
    assert ArchiveReader(tmp_path).entries()  # the archived days answer queries

    after = await all_answers(answers(db, tmp_path))
    same(before, after)


async def test_failed_read_back_deletes_nothing(db: Database, tmp_path: Path) -> None:
    await seed(db)
    rows_before = await count(db, MINUTE_TABLE)

    async def truncate(table: str, relative: str) -> None:
        path = tmp_path / relative
        path.write_bytes(path.read_bytes()[:100])

    results = await archiver(db, tmp_path, truncate).run((MINUTE_TABLE,))

    assert [(r.status, r.action) for r in results] == [("verify_failed", "exported")]
    assert "read_back_failed" in results[0].detail
    assert exit_code(results) == 4
    assert await count(db, MINUTE_TABLE) == rows_before
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == []  # dropped: the next run exports the day again
    again = await archiver(db, tmp_path).run((MINUTE_TABLE,))
    assert [r.status for r in again] == ["ok", "ok"]
    assert await count(db, MINUTE_TABLE) == 0


@pytest.mark.parametrize("change", ["update", "insert"])
async def test_row_changed_between_export_and_delete_deletes_nothing(
    db: Database, tmp_path: Path, change: str
) -> None:
    await seed(db)
    rows_before = await count(db, MINUTE_TABLE)
    day = D - 2 * DAY_MS

    async def meddle(table: str, relative: str) -> None:
        if change == "update":  # same keys, new values: only the content checksum sees it
            sql = (
                "UPDATE minute_prices SET max_price = max_price + 1"
                " WHERE timestamp = to_timestamp($1 / 1000.0) AND exchange = 'ex1'"
                " AND pair_name = 'BTCUSDT'"
            )
        else:
            sql = (
                "INSERT INTO minute_prices VALUES ('BTCUSDT', 'ex1',"
                " to_timestamp($1 / 1000.0) + interval '1 minute', 1, 1, 1, 1)"
            )
        await db.run(lambda conn: conn.execute(sql, day))

    results = await archiver(db, tmp_path, meddle).run((MINUTE_TABLE,))

    assert [(r.status, r.action) for r in results] == [("conflict", "exported")]
    assert exit_code(results) == 3
    added = 1 if change == "insert" else 0
    assert await count(db, MINUTE_TABLE) == rows_before + added
    assert json.loads((tmp_path / "manifest.json").read_text())["files"] == []
    again = await archiver(db, tmp_path).run((MINUTE_TABLE,))  # re-exports the current rows
    assert [r.status for r in again] == ["ok", "ok"]
    assert sum(r.rows for r in again) == rows_before + added
    assert await count(db, MINUTE_TABLE) == 0


async def test_rerun_is_idempotent_and_completes_an_interrupted_delete(
    db: Database, tmp_path: Path
) -> None:
    await seed(db)
    rows_before = await count(db, MINUTE_TABLE)

    class Crash(Exception):
        pass

    async def crash(table: str, relative: str) -> None:
        raise Crash  # between the export and the delete

    with pytest.raises(Crash):
        await archiver(db, tmp_path, crash).run((MINUTE_TABLE,))
    assert await count(db, MINUTE_TABLE) == rows_before
    states = [f["state"] for f in json.loads((tmp_path / "manifest.json").read_text())["files"]]
    assert states == ["exported"]

    resumed = await archiver(db, tmp_path).run((MINUTE_TABLE,))
    assert [r.action for r in resumed] == ["verified+deleted", "exported+deleted"]
    files = sorted((tmp_path / MINUTE_TABLE).iterdir())
    assert len(files) == 2  # no second copy of the first day
    stamps = [f.stat().st_mtime_ns for f in files]

    again: list[DayResult] = await archiver(db, tmp_path).run((MINUTE_TABLE,))
    assert [(r.status, r.action) for r in again] == [("ok", "verified"), ("ok", "verified")]
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / MINUTE_TABLE).iterdir())] == stamps
    assert sum(r.rows for r in again) == rows_before

    # A crash after the delete committed, before the manifest said so: recorded as done.
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["files"][0]["state"] = "exported"
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    finished = await archiver(db, tmp_path).run((MINUTE_TABLE,))
    assert [r.action for r in finished] == ["verified+delete_completed", "verified"]
    assert all(r.status == "ok" for r in finished)


async def test_late_replay_into_an_archived_minute_is_refused_and_counted(
    db: Database, tmp_path: Path
) -> None:
    await seed(db)
    await archiver(db, tmp_path).run((MINUTE_TABLE,))
    q = answers(db, tmp_path)
    before = await all_answers(q)
    inner = PostgresMinuteStore(db)
    store = ArchivedMinuteStore(inner, ArchiveReader(tmp_path))
    late = MinuteRow("ex1", "BTCUSDT", D - DAY_MS + 60_000, 1.0, 1.0, 1.0, 99, 60_000)
    fresh = MinuteRow("ex1", "BTCUSDT", D + 7 * 60_000, 150.0, 150.0, 150.0, 1, 60_000)

    writer = MinuteWriter(store, JsonlSpillFile(tmp_path / "spill.jsonl"), 100, lambda: NOW)
    await writer.start()
    try:  # the minute writer's own path: submit, then flush until durable
        writer.submit([late, fresh])
        await writer.flush()
    finally:
        await writer.aclose()

    assert store.refused_archived_rows == 1
    assert writer.status()["state"] == "up"  # a refusal is not an outage: nothing retried
    assert await count(db, MINUTE_TABLE) == 0  # no second copy of the archived minute
    assert fresh in await inner.minutes_since(D)
    after = await all_answers(q)
    # The fresh row changes today's answers only: the archived days' stay as they were.
    assert [a for a in after if a.period == "all" and a.exchange == "ex2"] == [
        b for b in before if b.period == "all" and b.exchange == "ex2"
    ]
    horizon = await ArchiveSource(db).horizon_ms()
    assert horizon == D
