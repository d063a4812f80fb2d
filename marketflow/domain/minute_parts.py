"""The parts of a minute row kept between rewrites, so a rewrite costs what changed.

A minute that closed by our clock while its feed still sends it (a backlog, a replay, a feed
behind us) is written again at every sweep: with Redis emptied by a crash only the flush
interval may be lost. With thousands of pairs catching up, rebuilding each row from its 60
seconds at every sweep took most of a core and kept the daemon behind. ``MinuteParts`` keeps
the last row's per-second states and its count, low and high; a rewrite replaces only the
seconds changed since (``changed``, filled as the window hands its dirty seconds to the
cache) and sums the totals with ``math.fsum`` as the full build does, so the row is the same
one, to the last bit. The seconds are also kept packed (``seconds_pack``), so the writer stores
the row without packing its 60 seconds again.

The low and high can be kept running because a second only gains ticks between two rewrites;
whatever replaces a second otherwise (a restore's seed, an eviction, packing) drops the parts.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence

from marketflow.domain.aggregates import MinuteRow, SecondState
from marketflow.domain.seconds_pack import RECORD, pack


class MinuteParts:
    """The states of one minute's last row, in second order, and their count, low and high."""

    __slots__ = (
        "at",
        "built_ms",
        "changed",
        "count",
        "high",
        "low",
        "packed",
        "start",
        "states",
        "totals",
    )

    def __init__(self, minute_start_s: int, states: Sequence[SecondState]) -> None:
        self.start = minute_start_s
        self.states = list(states)
        self.packed = bytearray(pack(minute_start_s, self.states))
        self.at = {st[0]: i for i, st in enumerate(self.states)}
        self.totals = [st[3] for st in self.states]
        self.count = sum(st[4] for st in self.states)
        self.low = min(st[1] for st in self.states)
        self.high = max(st[2] for st in self.states)
        self.changed: set[int] = set()  # seconds changed since the last row
        self.built_ms = 0  # our clock when its row was last emitted (set by the window)

    def refresh(self, seconds: Mapping[int, Sequence[float]]) -> bool:
        """Take the changed seconds from the window's open ``seconds``; False when one is no
        longer there (then the caller builds the row in full)."""
        states, at, totals, packed = self.states, self.at, self.totals, self.packed
        size, start = RECORD.size, self.start
        for s in self.changed:
            b = seconds.get(s)
            if b is None:
                return False
            st = (s, b[0], b[1], b[2], int(b[3]))
            record = (s - start, b[0], b[1], b[2], st[4])
            i = at.get(s)
            if i is not None:
                self.count += st[4] - states[i][4]
                states[i] = st
                totals[i] = st[3]
                RECORD.pack_into(packed, i * size, *record)
            elif not states or s > states[-1][0]:  # the common case: the feed's next second
                at[s] = len(states)
                states.append(st)
                totals.append(st[3])
                packed += RECORD.pack(*record)
                self.count += st[4]
            else:
                i = bisect_left(states, (s,))
                states.insert(i, st)
                totals.insert(i, st[3])
                packed[i * size : i * size] = RECORD.pack(*record)
                self.at = at = {x[0]: k for k, x in enumerate(states)}
                self.count += st[4]
            if st[1] < self.low:
                self.low = st[1]
            if st[2] > self.high:
                self.high = st[2]
        self.changed.clear()
        return True

    def row(self, exchange: str, symbol: str, minute_ms: int, covered_ms: int | None) -> MinuteRow:
        states = self.states
        total = math.fsum(self.totals) if len(states) > 1 else states[0][3]
        return MinuteRow(
            exchange,
            symbol,
            minute_ms,
            total / self.count,
            self.low,
            self.high,
            self.count,
            covered_ms,
            tuple(states),
            bytes(self.packed),
        )
