"""Seconds of one minute packed into bytes: the window's closed minutes and the stored rows.

Record: offset of the second in its minute (uint8), low, high, total (float64) and count
(uint32), little-endian: 29 bytes a second, at most 1,740 bytes a minute. A window keeps
its closed minutes this way (about 30 bytes a second instead of ~270 for a dict entry, an
int key, a list and its floats); PostgreSQL, SQLite and the spill file store the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

RECORD = struct.Struct("<BdddI")


def pack(minute_start_s: int, seconds: Iterable[tuple[int, float, float, float, int]]) -> bytes:
    """``(second, low, high, total, count)`` of one minute, in second order."""
    p = RECORD.pack
    return b"".join(p(s - minute_start_s, lo, hi, t, n) for s, lo, hi, t, n in seconds)


def unpack(minute_start_s: int, blob: bytes) -> Iterator[tuple[int, float, float, float, int]]:
    for off, lo, hi, total, n in RECORD.iter_unpack(blob):
        yield minute_start_s + off, lo, hi, total, n
