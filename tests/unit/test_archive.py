"""The archive's rules and its use case with fakes: durations, days, checksums, the manifest,
the refusal rule, and what the run deletes (or not) when a read-back or a delete check fails.
The history reader is driven over real Parquet files in a temporary directory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from marketflow.adapters.archive.history import ArchivedMinuteStore, ArchiveReader
from marketflow.adapters.archive.parquet import DayFileWriter, ParquetArchive, read_checks
from marketflow.adapters.minute_codec import encode_seconds
from marketflow.app.archive import Archiver, Sink, exit_code
from marketflow.domain.aggregates import Aggregate, History, MinuteRow
from marketflow.domain.archive import (
    DAY_MS,
    MINUTE_TABLE,
    ArchiveFileError,
    DayChecks,
    Manifest,
    ManifestEntry,
    checksum,
    cutoff_day,
    minute_key_text,
    parse_duration,
    refuse_archived,
)
from marketflow.domain.errors import ConfigError, StoreUnavailable
from marketflow.domain.ports import MinuteStore
from marketflow.entrypoints.cli import main
from marketflow.settings import load_settings

D = 19_675 * DAY_MS


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604_800), ("12h", 43_200), ("30m", 1_800), (" 45s ", 45)]
)
def test_durations_parse_to_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["7", "d", "7w", "-1d", "0m", "1.5h", "", "7d1h"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_cutoff_keeps_the_day_holding_the_cut_off() -> None:
    assert cutoff_day(D + 5 * 3_600_000, 3 * 3600) == D
    assert cutoff_day(D + 5 * 3_600_000, 6 * 3600) == D - DAY_MS
    assert cutoff_day(D, 7 * 86_400) == D - 7 * DAY_MS


def test_checksum_is_order_independent_and_sees_any_key() -> None:
    keys = [minute_key_text("ex1", "BTCUSDT", D + i * 60_000) for i in range(50)]
    assert checksum(keys) == checksum(reversed(keys))
    assert checksum(keys)[0] == 50
    changed = [*keys[:-1], minute_key_text("ex1", "BTCUSDT", D + 50 * 60_000)]
    assert checksum(changed)[1] != checksum(keys)[1]
    assert checksum(keys[:-1])[1] != checksum(keys)[1]


def test_checksum_is_the_documented_md5_sum() -> None:
    texts = ["1", "2", "ex\x1fBTC\x1f60000"]
    expected = sum(
        int.from_bytes(hashlib.md5(t.encode()).digest()[:8], "big", signed=True)  # noqa: S324
        for t in texts
    ) % (1 << 64)
    assert checksum(texts) == (3, expected)
    assert minute_key_text("ex", "BTC", 60_000) == "ex\x1fBTC\x1f60000"


def entry(day_ms: int = D, state: str = "exported", rows: int = 3) -> ManifestEntry:
    return ManifestEntry(
        MINUTE_TABLE,
        "2023-11-14",
        day_ms,
        f"minute_prices/minute_prices-{day_ms}.parquet",
        rows,
        "00000000000000ff",
        "0000000000000001",
        day_ms,
        day_ms + 60_000,
        state=state,  # type: ignore[arg-type]
    )


def test_manifest_round_trips_through_json() -> None:
    m = Manifest.empty()
    m.put(entry())
    m.put(entry(D + DAY_MS, "archived"))
    back = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert back == m
    assert [e.day_ms for e in back.archived_days(MINUTE_TABLE)] == [D + DAY_MS]
    assert back.to_json()["schema_version"] == 1
    assert entry().checks() == DayChecks(3, 255, 1, D, D + 60_000)


@pytest.mark.parametrize("doc", [[], {"schema_version": 2, "files": []}, {"schema_version": 1}])
def test_manifest_of_unknown_shape_is_refused(doc: Any) -> None:
    with pytest.raises(ValueError, match="manifest"):
        Manifest.from_json(doc)


def test_rows_before_the_horizon_are_refused() -> None:
    rows = [MinuteRow("ex", "BTC", D + i * 60_000, 1.0, 1.0, 1.0, 1) for i in (-1, 0, 1)]
    kept, refused = refuse_archived(rows, D)
    assert (kept, refused) == (rows[1:], 1)
    assert refuse_archived(rows, None) == (rows, 0)


# -- the use case with fakes ----------------------------------------------------------------


class FakeDb:
    def __init__(self, rows: int = 3) -> None:
        self.rows = rows
        self.deleted: list[int] = []
        self.found: DayChecks | None = None  # what the delete finds (None: the export)

    async def days_before(self, table: str, before_ms: int) -> dict[int, int]:
        return {D: self.rows} if table == MINUTE_TABLE and self.rows else {}

    async def export_day(self, table: str, day_ms: int, sink: Sink) -> DayChecks:
        await sink({"k": list(range(self.rows))})
        return DayChecks(self.rows, 255, 1, day_ms, day_ms)

    async def delete_day(self, table: str, day_ms: int, expected: DayChecks) -> DayChecks:
        found = self.found or expected
        if found == expected or found.rows == 0:
            self.deleted.append(day_ms)
        return found


class FakeWriter:
    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, columns: dict[str, list[Any]]) -> None:
        pass

    def finish(self) -> str:
        return self.path

    def abort(self) -> None:
        pass


class FakeFiles:
    def __init__(self, readable: bool = True) -> None:
        self.manifest = Manifest.empty()
        self.readable = readable
        self.removed: list[str] = []

    def load_manifest(self) -> Manifest:
        return Manifest(dict(self.manifest.entries))

    def save_manifest(self, manifest: Manifest) -> None:
        self.manifest = Manifest(dict(manifest.entries))

    def open_day(self, table: str, day_ms: int) -> FakeWriter:
        return FakeWriter(f"{table}/{day_ms}.parquet")

    def read_checks(self, relative: str, table: str) -> tuple[int, int]:
        if not self.readable:
            raise ArchiveFileError("truncated")
        return 3, 255

    def remove(self, relative: str) -> None:
        self.removed.append(relative)

    def relative(self, path: Any) -> str:
        return str(path)


def run(db: FakeDb, files: FakeFiles) -> Archiver:
    return Archiver(db, files, 3600, lambda: D + 2 * DAY_MS)


async def test_an_unreadable_file_deletes_nothing_and_is_forgotten() -> None:
    db, files = FakeDb(), FakeFiles(readable=False)
    results = await run(db, files).run()
    assert [(r.status, r.action) for r in results] == [("verify_failed", "exported")]
    assert exit_code(results) == 4
    assert db.deleted == []
    assert files.manifest.entries == {}
    assert files.removed == [f"{MINUTE_TABLE}/{D}.parquet"]


async def test_a_delete_check_mismatch_is_a_conflict() -> None:
    db, files = FakeDb(), FakeFiles()
    db.found = DayChecks(4, 255, 1)
    results = await run(db, files).run()
    assert [r.status for r in results] == ["conflict"]
    assert exit_code(results) == 3
    assert db.deleted == []
    assert files.manifest.entries == {}


async def test_a_good_day_is_deleted_then_only_verified() -> None:
    db, files = FakeDb(), FakeFiles()
    first = await run(db, files).run()
    assert [(r.status, r.action) for r in first] == [("ok", "exported+deleted")]
    assert files.manifest.get(MINUTE_TABLE, D) is not None
    assert files.manifest.entries[(MINUTE_TABLE, D)].state == "archived"
    db.rows = 0  # gone from the database
    again = await run(db, files).run()
    assert [(r.status, r.action) for r in again] == [("ok", "verified")]
    assert db.deleted == [D]


# -- files and the history reader -----------------------------------------------------------


def write_day(root: Path, rows: list[MinuteRow]) -> ManifestEntry:
    w = DayFileWriter(root, MINUTE_TABLE, D)
    w.write(
        {
            "exchange": [r.exchange for r in rows],
            "pair_name": [r.symbol for r in rows],
            "minute_ms": [r.minute_ms for r in rows],
            "average_price": [r.average for r in rows],
            "min_price": [r.low for r in rows],
            "max_price": [r.high for r in rows],
            "tick_count": [r.count for r in rows],
            "covered_ms": [r.covered_ms for r in rows],
            "seconds": [encode_seconds(r.minute_ms, r.seconds) for r in rows],
        }
    )
    path = w.finish()
    n, keys = read_checks(path, MINUTE_TABLE)
    e = ManifestEntry(
        MINUTE_TABLE, "d", D, str(path.relative_to(root)), n, f"{keys:016x}", "0", None, None
    )
    ParquetArchive(root).save_manifest(Manifest({(MINUTE_TABLE, D): e.archived()}))
    return e


def day_rows() -> list[MinuteRow]:
    out = []
    for i in range(10):
        m = D + i * 60_000
        secs = tuple((m // 1000 + s, 10.0 + i + s, 10.0 + i + s, 10.0 + i + s, 1) for s in (0, 30))
        total = sum(x[3] for x in secs)
        out.append(MinuteRow("ex1", "BTC", m, total / 2, 10.0 + i, 40.0 + i, 2, 60_000, secs))
        out.append(MinuteRow("ex2", "BTC", m, 5.0, 5.0, 5.0, 1, 30_000))
    return out


def test_day_file_reads_back_its_keys_and_a_truncated_one_fails(tmp_path: Path) -> None:
    rows = day_rows()
    e = write_day(tmp_path, rows)
    assert read_checks(tmp_path / e.file, MINUTE_TABLE) == checksum(
        minute_key_text(*r.key) for r in rows
    )
    assert not list((tmp_path / MINUTE_TABLE).glob(".*.tmp"))
    path = tmp_path / e.file
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ArchiveFileError):
        read_checks(path, MINUTE_TABLE)


def test_reader_answers_whole_days_from_summaries_and_cut_days_from_rows(tmp_path: Path) -> None:
    rows = day_rows()
    write_day(tmp_path, rows)
    reader = ArchiveReader(tmp_path)
    entries = reader.entries()
    whole = reader.part(entries, "BTC", {"ex1": D + 2 * DAY_MS}, None)
    expect = Aggregate.merged([r.aggregate() for r in rows if r.exchange == "ex1"])
    assert whole.history.aggregate == expect
    assert (whole.history.minutes, whole.history.incomplete_minutes) == (10, 0)
    assert reader.files_read == 1
    again = reader.part(entries, "BTC", {"ex1": D + 2 * DAY_MS, "ex2": D + 2 * DAY_MS}, None)
    assert reader.files_read == 1  # summaries are cached
    assert again.history.incomplete_minutes == 10  # the ex2 rows were half covered
    # A bound and a start inside the day: only rows in [start, bound), plus the straddler.
    since = D + 3 * 60_000 + 10_000
    cut = reader.part(entries, "BTC", {"ex1": D + 8 * 60_000}, since)
    inside = [
        r for r in rows if r.exchange == "ex1" and D + 4 * 60_000 <= r.minute_ms < D + 8 * 60_000
    ]
    assert cut.history.aggregate == Aggregate.merged([r.aggregate() for r in inside])
    assert [r.minute_ms for r in cut.partial_rows] == [D + 3 * 60_000]
    assert reader.files_read == 2


def test_reader_sees_a_new_manifest(tmp_path: Path) -> None:
    reader = ArchiveReader(tmp_path)
    assert reader.entries() == []
    write_day(tmp_path, day_rows())
    assert [e.day_ms for e in reader.entries()] == [D]


def test_cli_refuses_a_bad_duration(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["archive", "--older-than", "7w"])
    assert exc.value.code == 2
    assert "invalid duration" in capsys.readouterr().err


def test_archive_settings_refuse_a_bad_duration(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[archive]\ninterval = "soon"\n')
    with pytest.raises(ConfigError, match=r"archive\.interval"):
        load_settings(config)


def test_archive_without_postgres_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    assert main(["archive", "--config", str(config), "--out", str(tmp_path / "a")]) == 2
    assert "archive needs PostgreSQL" in capsys.readouterr().err


class EmptyStore:
    kind = "postgres"
    identity = "fake"

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> History:
        return History(None)


async def test_an_unreadable_archived_file_makes_history_unavailable(tmp_path: Path) -> None:
    e = write_day(tmp_path, day_rows())
    store = ArchivedMinuteStore(cast(MinuteStore, EmptyStore()), ArchiveReader(tmp_path))
    got = await store.history("BTC", {"ex1": D + DAY_MS})
    assert got.aggregate is not None
    assert got.minutes == 10
    (tmp_path / e.file).write_bytes(b"not parquet")
    fresh = ArchivedMinuteStore(cast(MinuteStore, EmptyStore()), ArchiveReader(tmp_path))
    with pytest.raises(StoreUnavailable, match="archive"):
        await fresh.history("BTC", {"ex1": D + DAY_MS})
