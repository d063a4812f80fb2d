"""The minute writer's spill file: JSON lines, appended and fsynced, read back in chunks.

One line per minute row (the row's fields, its per-second parts and coverage), and after each
appended batch one ``{"marks": {...}}`` line with the sources' marks the rows reflect. A torn
last line (a crash mid-append) is logged and skipped when read. Every method blocks on disk:
the writer calls them in a worker thread.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson

from marketflow.domain.aggregates import Mark, MinuteRow

log = logging.getLogger("marketflow.spill")


class JsonlSpillFile:
    """``RowSpill`` on one local file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def count(self) -> int:
        """Rows in the file (mark lines not counted)."""
        with self.path.open("rb") as f:
            return sum(1 for line in f if line.strip() and not line.startswith(b'{"marks"'))

    def append(self, rows: list[MinuteRow], marks: dict[str, Mark]) -> None:
        """Append rows (then the marks they reflect) and fsync, so they survive a crash
        right after."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        lines = [_encode(r) + b"\n" for r in rows]
        if marks:
            lines.append(orjson.dumps({"marks": {k: list(v) for k, v in marks.items()}}) + b"\n")
        with path.open("ab") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        if created:  # the new directory entry must be durable too
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_chunk(self, offset: int, limit: int) -> tuple[list[MinuteRow], dict[str, Mark], int]:
        """Up to ``limit`` rows (and the marks among them) from byte ``offset``, and the
        offset to read on from; unreadable lines are logged and skipped."""
        rows: list[MinuteRow] = []
        marks: dict[str, Mark] = {}
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return rows, marks, offset
        with f:
            f.seek(offset)
            while len(rows) < limit:
                line = f.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    got = _decode(line)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    # A torn last line (crash mid-append) or a hand-edited file: skip, say so.
                    log.error(  # noqa: TRY400
                        "minute_spill_bad_line path=%s line=%r error=%s", self.path, line[:200], exc
                    )
                    continue
                if isinstance(got, MinuteRow):
                    rows.append(got)
                else:
                    marks.update(got)
            return rows, marks, f.tell()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _encode(row: MinuteRow) -> bytes:
    return orjson.dumps(
        {
            "exchange": row.exchange,
            "symbol": row.symbol,
            "minute_ms": row.minute_ms,
            "average": row.average,
            "low": row.low,
            "high": row.high,
            "count": row.count,
            "covered_ms": row.covered_ms,
            "seconds": row.seconds,
        }
    )


def _decode(line: bytes) -> MinuteRow | dict[str, Mark]:
    d = orjson.loads(line)
    if "marks" in d:
        return {str(k): (int(v[0]), int(v[1])) for k, v in d["marks"].items()}
    minute_ms = int(d["minute_ms"])
    seconds = d.get("seconds")
    covered = d.get("covered_ms")
    return MinuteRow(
        str(d["exchange"]),
        str(d["symbol"]),
        minute_ms,
        float(d["average"]),
        float(d["low"]),
        float(d["high"]),
        int(d["count"]),
        None if covered is None else int(covered),
        None
        if seconds is None
        else tuple((int(x[0]), float(x[1]), float(x[2]), float(x[3]), int(x[4])) for x in seconds),
    )
