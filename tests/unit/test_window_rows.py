"""A minute row built from the window's seconds (the fast path) is the row the general one,
merging one Aggregate per second, builds: open seconds, packed minutes, any tick order."""

from __future__ import annotations

import random

from marketflow.domain.aggregates import Aggregate, MinuteRow
from marketflow.domain.window import PairWindow

T0 = 1_795_482_600_000  # a minute start


def general_row(w: PairWindow, minute_ms: int, covered: int | None) -> MinuteRow | None:
    secs = w.minute_seconds(minute_ms)
    agg = Aggregate.merged(
        [Aggregate(b[0], b[1], b[2], int(b[3]), s * 1000, s * 1000) for s, b in secs]
    )
    if agg is None:
        return None
    states = tuple((s, b[0], b[1], b[2], int(b[3])) for s, b in secs)
    return MinuteRow.of(w.exchange, w.symbol, minute_ms, agg, covered, states)


def test_rows_from_seconds_equal_the_general_merge_for_random_windows() -> None:
    rng = random.Random(7)
    checked = 0
    for trial in range(200):
        w = PairWindow("ex", "BTCUSDT")
        ticks = [
            (rng.choice([rng.uniform(1, 100), 50.0]), T0 + rng.randrange(0, 240_000))
            for _ in range(rng.randrange(1, 300))
        ]
        w.add(sorted(ticks, key=lambda t: t[1]) if trial % 2 else ticks, T0)
        w.take_dirty_seconds()
        if trial % 3 == 0:
            w.closed_minutes(T0 + 400_000, 2_000)  # closed minutes packed
            assert w.packed
        for m in range(5):
            minute = T0 + m * 60_000
            row = w.minute_row(minute, 60_000)
            assert row == general_row(w, minute, 60_000)
            checked += row is not None
    assert checked > 500
