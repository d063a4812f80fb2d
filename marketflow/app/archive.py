"""Archive old rows to Parquet, verify, and only then delete them from the database.

Per table, oldest day first, for each whole UTC day before the cut-off:

1. export (a day without a manifest entry): the day's rows from one database snapshot into a
   file (temporary name, fsync, rename), and an entry ``exported`` into the manifest;
2. verify: read the file back, its row count and key checksum must equal the entry's;
   a failure deletes nothing (an ``exported`` entry is dropped so the next run re-exports);
3. delete, in one transaction that checks the deleted rows' count, key and content
   checksums equal the entry's (rows changed or arrived since the export: rolled back, the
   run reports a conflict); then the entry becomes ``archived``.

A re-run is idempotent: an ``archived`` day is verified again, not re-exported; an
``exported`` day (a crash between export and delete) is verified and its delete completed;
a delete that committed before a crash (zero rows left) is recorded as done. A day that fails
stops its table: the archive stays a contiguous run of days, below one horizon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from marketflow.domain.archive import (
    TABLES,
    ArchiveFileError,
    DayChecks,
    Manifest,
    ManifestEntry,
    cutoff_day,
    day_name,
)

log = logging.getLogger("marketflow.archive")

Status = Literal["ok", "verify_failed", "conflict"]
Sink = Callable[[dict[str, list[Any]]], Awaitable[None]]

EXIT_OK = 0
EXIT_CONFLICT = 3  # rows changed or arrived since the export: nothing deleted
EXIT_VERIFY_FAILED = 4  # a file did not read back as written: nothing deleted


class ArchiveDatabase(Protocol):
    async def days_before(self, table: str, before_ms: int) -> dict[int, int]: ...

    async def export_day(self, table: str, day_ms: int, sink: Sink) -> DayChecks: ...

    async def delete_day(self, table: str, day_ms: int, expected: DayChecks) -> DayChecks: ...


class DayWriter(Protocol):
    path: Any

    def write(self, columns: dict[str, list[Any]]) -> None: ...

    def finish(self) -> Any: ...

    def abort(self) -> None: ...


class ArchiveFiles(Protocol):
    """The archive directory (blocking calls: run in a worker thread)."""

    def load_manifest(self) -> Manifest: ...

    def save_manifest(self, manifest: Manifest) -> None: ...

    def open_day(self, table: str, day_ms: int) -> DayWriter: ...

    def read_checks(self, relative: str, table: str) -> tuple[int, int]: ...

    def remove(self, relative: str) -> None: ...

    def relative(self, path: Any) -> str: ...


@dataclass(frozen=True, slots=True)
class DayResult:
    """One line of the run's report (printed as JSON by the CLI)."""

    table: str
    day: str
    status: Status
    action: str  # exported+deleted | verified+deleted | verified | delete_completed | none
    rows: int
    file: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def exit_code(results: list[DayResult]) -> int:
    statuses = {r.status for r in results}
    if "verify_failed" in statuses:
        return EXIT_VERIFY_FAILED
    if "conflict" in statuses:
        return EXIT_CONFLICT
    return EXIT_OK


# Awaited with (table, relative file) between writing a file and reading it back (tests).
AfterWrite = Callable[[str, str], Awaitable[None]]


class Archiver:
    """One archive run over every table; ``run()`` returns a result per (table, day)."""

    def __init__(
        self,
        db: ArchiveDatabase,
        files: ArchiveFiles,
        older_than_s: int,
        clock: Callable[[], int],
        *,
        after_write: AfterWrite | None = None,
    ) -> None:
        self._db = db
        self._files = files
        self._older_than_s = older_than_s
        self._clock = clock
        self._after_write = after_write

    async def run(self, tables: tuple[str, ...] = TABLES) -> list[DayResult]:
        before = cutoff_day(self._clock(), self._older_than_s)
        manifest = await asyncio.to_thread(self._files.load_manifest)
        results: list[DayResult] = []
        for table in tables:
            in_db = await self._db.days_before(table, before)
            listed = {d for (t, d) in manifest.entries if t == table and d < before}
            for day in sorted(set(in_db) | listed):
                result = await self._day(manifest, table, day, in_db.get(day, 0))
                results.append(result)
                log.log(
                    logging.INFO if result.status == "ok" else logging.ERROR,
                    "archive_day table=%s day=%s status=%s action=%s rows=%d detail=%s",
                    table,
                    result.day,
                    result.status,
                    result.action,
                    result.rows,
                    result.detail or "-",
                )
                if result.status != "ok":
                    break
        return results

    async def _save(self, manifest: Manifest) -> None:
        await asyncio.to_thread(self._files.save_manifest, manifest)

    async def _export(self, table: str, day: int) -> ManifestEntry:
        writer = await asyncio.to_thread(self._files.open_day, table, day)

        async def sink(columns: dict[str, list[Any]]) -> None:
            await asyncio.to_thread(writer.write, columns)

        try:
            checks = await self._db.export_day(table, day, sink)
            path = await asyncio.to_thread(writer.finish)
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise
        return ManifestEntry(
            table=table,
            day=day_name(day),
            day_ms=day,
            file=self._files.relative(path),
            rows=checks.rows,
            key_checksum=f"{checks.key_checksum:016x}",
            content_checksum=f"{checks.content_checksum:016x}",
            min_time_ms=checks.min_time_ms,
            max_time_ms=checks.max_time_ms,
        )

    async def _verify(self, entry: ManifestEntry) -> str:
        """Empty when the file reads back as the entry says, else why not."""
        try:
            rows, keys = await asyncio.to_thread(self._files.read_checks, entry.file, entry.table)
        except ArchiveFileError as exc:
            return f"read_back_failed: {exc}"
        if rows != entry.rows:
            return f"read_back_rows={rows} manifest_rows={entry.rows}"
        if f"{keys:016x}" != entry.key_checksum:
            return f"read_back_key_checksum={keys:016x} manifest={entry.key_checksum}"
        return ""

    async def _forget(self, manifest: Manifest, entry: ManifestEntry) -> None:
        """Drop an entry whose rows are still in the database (the next run re-exports)."""
        manifest.drop(entry.table, entry.day_ms)
        await self._save(manifest)
        await asyncio.to_thread(self._files.remove, entry.file)

    async def _day(self, manifest: Manifest, table: str, day: int, in_db: int) -> DayResult:
        entry = manifest.get(table, day)
        steps: list[str] = []
        if entry is None:
            entry = await self._export(table, day)
            manifest.put(entry)
            await self._save(manifest)
            steps.append("exported")
            if self._after_write is not None:
                await self._after_write(table, entry.file)

        def result(status: Status, detail: str = "", rows: int | None = None) -> DayResult:
            n = entry.rows if rows is None else rows
            action = "+".join(steps) or "none"
            return DayResult(table, entry.day, status, action, n, entry.file, detail)

        problem = await self._verify(entry)
        if problem:
            if entry.state == "exported":
                await self._forget(manifest, entry)
            return result("verify_failed", problem)
        if not steps:
            steps.append("verified")
        if entry.state == "archived" and in_db == 0:
            return result("ok")
        found = await self._db.delete_day(table, day, entry.checks())
        expected = entry.checks()
        same = (found.rows, found.key_checksum, found.content_checksum) == (
            expected.rows,
            expected.key_checksum,
            expected.content_checksum,
        )
        if found.rows and not same:
            detail = (
                f"rows changed or arrived since the export: database_rows={found.rows}"
                f" archived_rows={entry.rows}; nothing deleted"
            )
            if entry.state == "exported":
                await self._forget(manifest, entry)
            return result("conflict", detail, found.rows)
        steps.append("deleted" if found.rows else "delete_completed")
        manifest.put(entry.archived())
        await self._save(manifest)
        return result("ok")
