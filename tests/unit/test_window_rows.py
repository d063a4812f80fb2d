"""A minute row built from the window's seconds (the fast path) is the row the general one,
merging one Aggregate per second, builds: open seconds, packed minutes, any tick order."""

from __future__ import annotations

import random

from marketflow.adapters.minute_codec import encode_seconds
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
            assert w.minute_count(minute) == (row.count if row is not None else 0)
            checked += row is not None
    assert checked > 500


def test_rows_rewritten_from_kept_parts_equal_the_general_merge() -> None:
    """A feed behind our clock: its minutes have closed by our clock while it still sends
    them, so each sweep rewrites them from the parts kept since the last build. Mixed in:
    late ticks into earlier seconds, a restore's fuller seconds, evictions, packing."""
    rng = random.Random(11)
    rewrites = 0
    for _trial in range(40):
        w = PairWindow("ex", "BTCUSDT")
        feed = T0  # the feed's exchange time, far behind our clock
        clock = T0 + 300_000
        for _step in range(rng.randrange(50, 400)):
            feed += rng.choice([0, 0, 50, 400, 1_500, 9_000])
            ticks = [(rng.uniform(1, 100), feed + rng.randrange(0, 1000)) for _ in range(3)]
            if rng.random() < 0.15:  # late: an earlier second of this or the last minute
                ticks.append((rng.uniform(1, 100), max(T0, feed - rng.randrange(1, 90_000))))
            w.add(ticks, clock)
            if rng.random() < 0.05:
                s = max(T0, feed - rng.randrange(0, 60_000)) // 1000
                w.seed_second(s, 0.5, 200.0, 5_000.0, 1_000)
                w.mark_pending(s // 60 * 60_000)
            if rng.random() < 0.03:
                w.evict(300)
            w.take_dirty_seconds()
            clock += rng.choice([20, 20, 200, 4_000])  # now and then the feed goes quiet
            rewrites += len(w.parts)
            for row in w.closed_minutes(clock, 2_000):
                assert row == general_row(w, row.minute_ms, row.covered_ms)
                if row.packed is not None:  # what the stores write instead of packing
                    assert row.packed == encode_seconds(row.minute_ms, row.seconds)
    assert rewrites > 1_000  # the kept parts were used, not only built


def test_minute_count_counts_an_older_format_row_whole() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.seed_row(MinuteRow("ex", "BTCUSDT", T0, 2.0, 1.0, 3.0, 7))  # no per-second parts
    assert w.minute_count(T0) == 7
    assert w.minute_count(T0 + 60_000) == 0
