"""The Parquet archive's rules, free of any technology: durations, UTC days, the key
checksum both sides compute, the manifest, and the one refusal rule for late rows.

The key checksum is the sum, modulo 2**64, of the first 8 bytes (big-endian, signed) of the
MD5 of each key's text: order-independent, so the file (read back with pyarrow) and the
database (computed in SQL, see adapters/postgres/archive_source.py) agree whatever order
either returns rows in. The key texts are ``exchange \\x1f pair \\x1f minute_ms`` for minute
rows and the decimal ``id`` for FIX audit rows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from marketflow.domain.aggregates import MinuteRow

DAY_MS = 86_400_000
SCHEMA_VERSION = 1
MINUTE_TABLE = "minute_prices"
CAPTURE_TABLE = "fix_messages"
TABLES = (MINUTE_TABLE, CAPTURE_TABLE)
KEY_SEPARATOR = "\x1f"  # unit separator: in no exchange name or pair (both are validated)
_MOD = 1 << 64

_DURATION = re.compile(r"^\s*(\d+)\s*([dhms])\s*$")
_UNIT_S = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}

State = Literal["exported", "archived"]


class ArchiveFileError(RuntimeError):
    """A file of the archive is missing, unreadable or not what the manifest says."""


@dataclass(frozen=True, slots=True)
class DayChecks:
    """What one day's rows of a table add up to: the row count, the key checksum and the
    database's content checksum (both mod 2**64), and the oldest and newest row time."""

    rows: int
    key_checksum: int
    content_checksum: int
    min_time_ms: int | None = None
    max_time_ms: int | None = None


def parse_duration(text: str) -> int:
    """``7d``, ``12h``, ``30m``, ``45s`` as seconds; ValueError for anything else (or 0)."""
    match = _DURATION.match(text)
    if match is None:
        msg = f"invalid duration {text!r}: use a number and d, h, m or s (e.g. 7d, 12h, 30m)"
        raise ValueError(msg)
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds <= 0:
        msg = f"invalid duration {text!r}: must be more than zero"
        raise ValueError(msg)
    return seconds


def day_start(ms: int) -> int:
    """Start of the UTC day holding ``ms``."""
    return ms // DAY_MS * DAY_MS


def cutoff_day(now_ms: int, older_than_s: int) -> int:
    """The first day NOT archived: only whole UTC days ending at or before the cut-off
    (``now - older_than``) go to the archive, so each day's file is complete."""
    return day_start(now_ms - older_than_s * 1000)


def day_name(day_ms: int) -> str:
    return datetime.fromtimestamp(day_ms / 1000, UTC).strftime("%Y-%m-%d")


def key_hash(text: str) -> int:
    """The signed 64-bit hash of one key's text (PostgreSQL computes the same number)."""
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big", signed=True)  # noqa: S324


def checksum(texts: Iterable[str]) -> tuple[int, int]:
    """(count, sum of key hashes mod 2**64) of the key texts."""
    count = 0
    total = 0
    for text in texts:
        count += 1
        total += key_hash(text)
    return count, total % _MOD


def minute_key_text(exchange: str, pair: str, minute_ms: int) -> str:
    return f"{exchange}{KEY_SEPARATOR}{pair}{KEY_SEPARATOR}{minute_ms}"


def refuse_archived(
    rows: Sequence[MinuteRow], horizon_ms: int | None
) -> tuple[list[MinuteRow], int]:
    """The rows that may be written, and how many were refused: a row whose minute starts
    before the archived horizon belongs to a day already in the archive (and deleted from
    the store); writing it would make a second copy, so it is refused."""
    if horizon_ms is None or not rows:
        return list(rows), 0
    kept = [r for r in rows if r.minute_ms >= horizon_ms]
    return kept, len(rows) - len(kept)


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One archived file: a table's rows of one UTC day."""

    table: str
    day: str  # YYYY-MM-DD (UTC)
    day_ms: int
    file: str  # relative to the archive directory
    rows: int
    key_checksum: str  # hex of the 64-bit key checksum
    content_checksum: str  # the database's checksum of the rows' whole text at export
    min_time_ms: int | None
    max_time_ms: int | None
    schema_version: int = SCHEMA_VERSION
    state: State = "exported"  # "archived" once the rows are deleted from the database

    def archived(self) -> ManifestEntry:
        return replace(self, state="archived")

    def checks(self) -> DayChecks:
        return DayChecks(
            self.rows,
            int(self.key_checksum, 16),
            int(self.content_checksum, 16),
            self.min_time_ms,
            self.max_time_ms,
        )


@dataclass(slots=True)
class Manifest:
    """Every file of the archive, keyed by (table, day_ms)."""

    entries: dict[tuple[str, int], ManifestEntry]

    @classmethod
    def empty(cls) -> Manifest:
        return cls({})

    def get(self, table: str, day_ms: int) -> ManifestEntry | None:
        return self.entries.get((table, day_ms))

    def put(self, entry: ManifestEntry) -> None:
        self.entries[(entry.table, entry.day_ms)] = entry

    def drop(self, table: str, day_ms: int) -> None:
        self.entries.pop((table, day_ms), None)

    def archived_days(self, table: str) -> list[ManifestEntry]:
        """Entries whose rows left the database (only those answer queries), oldest first."""
        return sorted(
            (e for e in self.entries.values() if e.table == table and e.state == "archived"),
            key=lambda e: e.day_ms,
        )

    def to_json(self) -> dict[str, Any]:
        files = sorted(self.entries.values(), key=lambda e: (e.table, e.day_ms))
        return {"schema_version": SCHEMA_VERSION, "files": [asdict(e) for e in files]}

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        """Raises ValueError for a document that is not a manifest of a known version."""
        if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
            msg = "not an archive manifest of schema version 1"
            raise ValueError(msg)
        out = cls.empty()
        try:
            for item in doc["files"]:
                out.put(ManifestEntry(**item))
        except (KeyError, TypeError) as exc:
            msg = f"malformed archive manifest: {exc}"
            raise ValueError(msg) from exc
        return out
