"""Parquet files of the archive (pyarrow): one file per table and UTC day, and the manifest.

Every file and the manifest are written to a temporary name in the same directory, fsynced,
renamed over the final name and the directory fsynced: a crash leaves the old file or the new
one, never a torn one under the final name (and a reader on another node of the shared
directory sees one or the other). Blocking calls: callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from marketflow.domain.archive import (
    CAPTURE_TABLE,
    MINUTE_TABLE,
    ArchiveFileError,
    Manifest,
    checksum,
    day_name,
    minute_key_text,
)

MANIFEST = "manifest.json"
LOCK_FILE = ".archive.lock"

SCHEMAS: dict[str, pa.Schema] = {
    MINUTE_TABLE: pa.schema(
        [
            ("exchange", pa.string()),
            ("pair_name", pa.string()),
            ("minute_ms", pa.int64()),
            ("average_price", pa.float64()),
            ("min_price", pa.float64()),
            ("max_price", pa.float64()),
            ("tick_count", pa.int64()),
            ("covered_ms", pa.int32()),
            ("seconds", pa.binary()),
        ]
    ),
    CAPTURE_TABLE: pa.schema(
        [
            ("id", pa.int64()),
            ("received_us", pa.int64()),
            ("peer", pa.string()),
            ("begin_string", pa.string()),
            ("msg_type", pa.string()),
            ("sender", pa.string()),
            ("target", pa.string()),
            ("seq_num", pa.int64()),
            ("symbol", pa.string()),
            ("raw", pa.string()),
            ("fields", pa.string()),
        ]
    ),
}
KEY_COLUMNS = {MINUTE_TABLE: ["exchange", "pair_name", "minute_ms"], CAPTURE_TABLE: ["id"]}


def relative_path(table: str, day_ms: int) -> str:
    return f"{table}/{table}-{day_name(day_ms)}.parquet"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(final)
    _fsync_dir(final.parent)


class DayFileWriter:
    """Writes one day's rows as row groups to a temporary file; ``finish()`` publishes it."""

    def __init__(self, root: Path, table: str, day_ms: int) -> None:
        self.path = root / relative_path(table, day_ms)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._schema = SCHEMAS[table]
        self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")

    def write(self, columns: dict[str, list[Any]]) -> None:
        self._writer.write_table(pa.table(columns, schema=self._schema))

    def finish(self) -> Path:
        self._writer.close()
        _publish(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # closing a half-written file: best effort
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


def read_checks(path: Path, table: str) -> tuple[int, int]:
    """(rows, key checksum) of a file, reading only its key columns; ArchiveFileError when
    it cannot be read."""
    try:
        data = pq.read_table(path, columns=KEY_COLUMNS[table])
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveFileError(f"{path}: {type(exc).__name__}: {exc}") from exc
    if table == MINUTE_TABLE:
        cols = data.to_pydict()
        texts = (
            minute_key_text(e, p, m)
            for e, p, m in zip(cols["exchange"], cols["pair_name"], cols["minute_ms"], strict=True)
        )
        return checksum(texts)
    return checksum(str(i) for i in data.column("id").to_pylist())


def load_manifest(root: Path) -> Manifest:
    """The manifest of ``root`` (empty when there is none yet)."""
    path = root / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Manifest.empty()
    try:
        return Manifest.from_json(json.loads(text))
    except ValueError as exc:
        raise ArchiveFileError(f"{path}: {exc}") from exc


def save_manifest(root: Path, manifest: Manifest) -> None:
    root.mkdir(parents=True, exist_ok=True)
    final = root / MANIFEST
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    _publish(tmp, final)


def remove_file(root: Path, relative: str) -> None:
    (root / relative).unlink(missing_ok=True)


class ParquetArchive:
    """The archive directory (shared by every node) as the archive use case sees it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def load_manifest(self) -> Manifest:
        return load_manifest(self.root)

    def save_manifest(self, manifest: Manifest) -> None:
        save_manifest(self.root, manifest)

    def open_day(self, table: str, day_ms: int) -> DayFileWriter:
        return DayFileWriter(self.root, table, day_ms)

    def read_checks(self, relative: str, table: str) -> tuple[int, int]:
        return read_checks(self.root / relative, table)

    def remove(self, relative: str) -> None:
        remove_file(self.root, relative)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """An exclusive lock on the directory for one run (False: another run holds it).
        flock on a file of the shared directory: two nodes' scheduled runs do not overlap."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK_FILE).open("a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
