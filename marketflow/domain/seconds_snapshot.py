"""Every second the windows hold, captured at once and read lazily: what a refill writes.

A refill (the cache back after an outage, or emptied) writes everything held, with the marks
of the same instant. Building one tuple per second at once took ~6 s for 500 pairs
x 10 exchanges (3 million seconds), all of it holding the event loop. The capture copies only
the open seconds (packed minutes are immutable bytes, kept by reference), so the windows may
change right after; the buckets are made as the cache reads them, chunk by chunk, between
its round trips.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from marketflow.domain.aggregates import SecondRow, SecondState
from marketflow.domain.seconds_pack import RECORD, unpack

WindowCapture = tuple[str, str, list[SecondState], list[tuple[int, bytes]]]
"""exchange, symbol, the open seconds' states, the packed minutes (minute_ms, blob)."""


class SecondsSnapshot:
    """A sized, re-iterable collection of the captured seconds, in window order."""

    __slots__ = ("_captures", "_len")

    def __init__(self, captures: Iterable[WindowCapture]) -> None:
        self._captures = list(captures)
        self._len = sum(
            len(open_) + sum(len(blob) // RECORD.size for _, blob in packed)
            for _, _, open_, packed in self._captures
        )

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[SecondRow]:
        for exchange, symbol, open_, packed in self._captures:
            for s, lo, hi, total, n in open_:
                yield (exchange, symbol, s, lo, hi, total, n)
            for minute_ms, blob in packed:
                for s, lo, hi, total, n in unpack(minute_ms // 1000, blob):
                    yield (exchange, symbol, s, lo, hi, total, n)

    def __contains__(self, item: object) -> bool:
        return any(b == item for b in self)
