"""History queries over archived days: the minute store answers for what it still holds,
the Parquet files for the days the archive took from it, merged exactly as the store merges
its own rows (min of mins with the latest minute on a tie, max of maxes, sum and count).

Cheap enough for every all-history query: the manifest is re-read only when its file changes
(one ``stat`` per query), and each file is summarised once (per exchange and pair: min, max,
sum, count, rows, incomplete rows) from only the columns a summary needs; a day the query
covers whole is answered from its summary. Only a day cut by the query's bounds (a period
starting inside it, or a window bound inside it) is read, and then only that exchange's and
pair's rows (pyarrow filters) of that one file.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from marketflow.adapters.archive.parquet import MANIFEST, load_manifest
from marketflow.adapters.minute_codec import decode_seconds
from marketflow.domain.aggregates import FULL_MINUTE_MS, Aggregate, History, Mark, MinuteRow
from marketflow.domain.archive import DAY_MS, MINUTE_TABLE, ArchiveFileError, ManifestEntry
from marketflow.domain.errors import StoreUnavailable
from marketflow.domain.ports import MinuteStore
from marketflow.lifecycle import Closing

_SUMMARY_COLUMNS = [
    "exchange", "pair_name", "minute_ms", "average_price", "min_price", "max_price",
    "tick_count", "covered_ms",
]  # fmt: skip
_ROW_COLUMNS = [*_SUMMARY_COLUMNS, "seconds"]


@dataclass(slots=True)
class _Summary:
    """One (exchange, pair)'s rows in one file."""

    low: float
    high: float
    low_ms: int
    high_ms: int
    totals: list[float]
    count: int
    rows: int
    incomplete: int

    def aggregate(self) -> Aggregate:
        total = math.fsum(self.totals)
        return Aggregate(self.low, self.high, total, self.count, self.low_ms, self.high_ms)


def _summarise(path: Path) -> dict[tuple[str, str], _Summary]:
    cols = pq.read_table(path, columns=_SUMMARY_COLUMNS).to_pydict()
    out: dict[tuple[str, str], _Summary] = {}
    for ex, pair, m, avg, lo, hi, n, cov in zip(*(cols[c] for c in _SUMMARY_COLUMNS), strict=True):
        s = out.get((ex, pair))
        incomplete = 1 if cov is None or cov < FULL_MINUTE_MS else 0
        if s is None:
            out[(ex, pair)] = _Summary(lo, hi, m, m, [avg * n], n, 1, incomplete)
            continue
        # The latest minute wins a tie, as in the store's own query and Aggregate.merge.
        if lo < s.low or (lo == s.low and m > s.low_ms):
            s.low, s.low_ms = lo, m
        if hi > s.high or (hi == s.high and m > s.high_ms):
            s.high, s.high_ms = hi, m
        s.totals.append(avg * n)
        s.count += n
        s.rows += 1
        s.incomplete += incomplete
    return out


def _rows(path: Path, exchange: str, symbol: str) -> list[MinuteRow]:
    filters = [("exchange", "==", exchange), ("pair_name", "==", symbol)]
    cols = pq.read_table(path, columns=_ROW_COLUMNS, filters=filters).to_pydict()
    return [
        MinuteRow(ex, pair, m, avg, lo, hi, n, cov, decode_seconds(m, secs))
        for ex, pair, m, avg, lo, hi, n, cov, secs in zip(
            *(cols[c] for c in _ROW_COLUMNS), strict=True
        )
    ]


@dataclass(slots=True)
class ArchivedPart:
    """The archive's share of a query: whole rows merged, and rows straddling its start."""

    history: History
    partial_rows: list[MinuteRow]


class ArchiveReader:
    """Reads the archive directory for queries; thread-safe (queries run in worker threads)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: list[ManifestEntry] = []
        self._summaries: dict[str, dict[tuple[str, str], _Summary]] = {}
        self.files_read = 0  # files opened so far (summaries and cut days): /health

    def entries(self) -> list[ManifestEntry]:
        """Archived minute days, oldest first; the manifest is re-read when it changed."""
        try:
            st = os.stat(self.root / MANIFEST)
        except FileNotFoundError:
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._entries = load_manifest(self.root).archived_days(MINUTE_TABLE)
                self._stamp = stamp
                live = {e.file for e in self._entries}
                self._summaries = {f: s for f, s in self._summaries.items() if f in live}
            return self._entries

    def _summary(self, entry: ManifestEntry) -> dict[tuple[str, str], _Summary]:
        with self._lock:
            got = self._summaries.get(entry.file)
        if got is None:
            got = _summarise(self.root / entry.file)
            with self._lock:
                self.files_read += 1
                self._summaries[entry.file] = got
        return got

    def part(
        self,
        entries: Sequence[ManifestEntry],
        symbol: str,
        before: Mapping[str, int],
        since_ms: int | None,
    ) -> ArchivedPart:
        """The archived days' share of ``MinuteStore.history`` (same arguments)."""
        start: int | None = None
        boundary: int | None = None  # the minute straddling the start: its seconds from it
        if since_ms is not None:
            start = -(-since_ms // 60_000) * 60_000
            boundary = None if start == since_ms else start - 60_000
        parts: list[Aggregate] = []
        out = History(None)
        partial: list[MinuteRow] = []
        for entry in entries:
            first, end = entry.day_ms, entry.day_ms + DAY_MS
            for exchange, bound in before.items():
                if first >= bound:
                    continue
                if (start is None or first >= start) and end <= bound:
                    s = self._summary(entry).get((exchange, symbol))
                    if s is not None:
                        parts.append(s.aggregate())
                        out.minutes += s.rows
                        out.incomplete_minutes += s.incomplete
                    continue
                touches = start is None or end > start
                holds_boundary = boundary is not None and first <= boundary < end
                if not (touches or holds_boundary):
                    continue
                with self._lock:
                    self.files_read += 1
                for row in _rows(self.root / entry.file, exchange, symbol):
                    if row.minute_ms >= bound:
                        continue
                    if start is None or row.minute_ms >= start:
                        parts.append(row.aggregate())
                        out.minutes += 1
                        out.incomplete_minutes += 0 if row.complete else 1
                    elif row.minute_ms == boundary:
                        partial.append(row)
        out.aggregate = Aggregate.merged(parts)
        return ArchivedPart(out, partial)


class ArchivedMinuteStore(Closing):
    """A ``MinuteStore`` whose history also covers the archived days (everything else is the
    wrapped store's). Rows of archived days are refused by the wrapped store itself, in the
    write's transaction (adapters/postgres/minute_store.py)."""

    def __init__(self, inner: MinuteStore, reader: ArchiveReader) -> None:
        self.inner = inner
        self.reader = reader
        self.kind = inner.kind
        self.identity = inner.identity

    @property
    def refused_archived_rows(self) -> int:
        return int(getattr(self.inner, "refused_archived_rows", 0))

    async def upsert_minutes(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None:
        await self.inner.upsert_minutes(rows, marks)

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> History:
        out = await self.inner.history(symbol, before, since_ms)
        try:
            entries = await asyncio.to_thread(self.reader.entries)
            if not entries or not before:
                return out
            got = await asyncio.to_thread(self.reader.part, entries, symbol, before, since_ms)
        except (OSError, ArchiveFileError, pa.ArrowException) as exc:
            # An unreadable archive makes the answer partial (as a store that is down does),
            # never a 500 and never an answer silently without the archived days.
            raise StoreUnavailable(f"archive: {type(exc).__name__}: {exc}") from exc
        parts = [a for a in (out.aggregate, got.history.aggregate) if a is not None]
        merged = History(
            Aggregate.merged(parts),
            out.minutes + got.history.minutes,
            out.incomplete_minutes + got.history.incomplete_minutes,
        )
        if got.partial_rows and since_ms is not None:
            merged.add_partial(got.partial_rows, since_ms // 1000)
        return merged

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        return await self.inner.minutes_since(since_ms)

    async def newest_minute_ms(self) -> int | None:
        return await self.inner.newest_minute_ms()

    async def load_marks(self) -> dict[str, Mark]:
        return await self.inner.load_marks()

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()
