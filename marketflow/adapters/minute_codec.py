"""The per-second parts of a minute row, packed for storage (PostgreSQL bytea, SQLite BLOB,
the spill file as hex): the format of ``marketflow.domain.seconds_pack``, one record per
second, in second order.
"""

from __future__ import annotations

from marketflow.domain.aggregates import SecondState
from marketflow.domain.seconds_pack import RECORD, pack, unpack


def encode_seconds(
    minute_ms: int, seconds: tuple[SecondState, ...] | None, packed: bytes | None = None
) -> bytes | None:
    """``packed``: the same seconds already packed (``MinuteRow.packed``), used as they are."""
    if seconds is None:
        return None
    return packed if packed is not None else pack(minute_ms // 1000, seconds)


def decode_seconds(minute_ms: int, blob: bytes | None) -> tuple[SecondState, ...] | None:
    """The seconds of a stored row; None for a row without them (or an unreadable blob)."""
    if blob is None or len(blob) % RECORD.size:
        return None
    return tuple(unpack(minute_ms // 1000, blob))
