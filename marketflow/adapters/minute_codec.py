"""The per-second parts of a minute row, packed for storage (PostgreSQL bytea, SQLite BLOB,
the spill file as hex): one record per second, in second order.

Record: offset of the second in its minute (uint8), low, high, total (float64) and count
(uint32), little-endian: 29 bytes a second, at most 1,740 bytes a row.
"""

from __future__ import annotations

import struct

from marketflow.domain.aggregates import SecondState

_RECORD = struct.Struct("<BdddI")


def encode_seconds(minute_ms: int, seconds: tuple[SecondState, ...] | None) -> bytes | None:
    if seconds is None:
        return None
    start = minute_ms // 1000
    return b"".join(_RECORD.pack(s - start, lo, hi, total, n) for s, lo, hi, total, n in seconds)


def decode_seconds(minute_ms: int, blob: bytes | None) -> tuple[SecondState, ...] | None:
    """The seconds of a stored row; None for a row without them (or an unreadable blob)."""
    if blob is None or len(blob) % _RECORD.size:
        return None
    start = minute_ms // 1000
    return tuple(
        (start + off, lo, hi, total, n) for off, lo, hi, total, n in _RECORD.iter_unpack(blob)
    )
