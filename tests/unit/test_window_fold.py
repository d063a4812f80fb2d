"""PairWindow folding and emitting with literal expectations (written for mutation testing of
marketflow/domain/window.py: bucket low/high updates, late ticks, latest ties, minute rows)."""

from __future__ import annotations

from marketflow.domain.aggregates import LatestPrice, MinuteRow, SecondBucket
from marketflow.domain.window import PairWindow


def test_low_and_high_of_a_second_follow_every_tick() -> None:
    w = PairWindow("ex", "BTC")
    w.add([(2.0, 1_000), (3.0, 1_100), (2.5, 1_200), (1.5, 1_300), (3.0, 1_400)], 7)
    assert w.seconds == {1: (1.5, 3.0, 12.0, 5)}
    w.add([(2.0, 2_000), (1.0, 2_100), (1.5, 2_200), (4.0, 2_300), (0.5, 2_400)], 8)
    assert w.seconds[2] == (0.5, 4.0, 9.0, 5)


def test_late_ticks_are_counted_each_and_the_rest_of_the_batch_still_folds() -> None:
    w = PairWindow("ex", "BTC", floor_second=10)
    w.add([(1.0, 9_000), (2.0, 9_999), (3.0, 10_000), (4.0, 5_000), (5.0, 11_000)], 0)
    assert w.late == 3
    assert w.seconds == {10: (3.0, 3.0, 3.0, 1), 11: (5.0, 5.0, 5.0, 1)}
    w.add([(1.0, 1_000)], 0)
    assert w.late == 4


def test_latest_is_the_newest_timestamp_and_a_tie_goes_to_the_later_tick() -> None:
    w = PairWindow("ex", "BTC")
    assert w.latest() is None
    w.add([(1.0, 5_000), (2.0, 5_000)], 100)
    assert w.latest() == LatestPrice("ex", "BTC", 2.0, 5_000, 100)
    w.add([(3.0, 4_000)], 200)  # older: not the latest, receipt time unchanged
    assert w.latest() == LatestPrice("ex", "BTC", 2.0, 5_000, 100)
    w.add([(4.0, 5_000)], 300)  # same timestamp, new price
    assert w.latest() == LatestPrice("ex", "BTC", 4.0, 5_000, 300)
    w.add([(4.0, 5_000)], 400)  # same timestamp and price: nothing new
    assert w.latest() == LatestPrice("ex", "BTC", 4.0, 5_000, 300)
    w.add([(4.0, 6_999)], 500)  # same price, newer timestamp
    assert w.latest() == LatestPrice("ex", "BTC", 4.0, 6_999, 500)
    assert w.newest_second == 6


def test_newest_second_only_moves_forward() -> None:
    w = PairWindow("ex", "BTC")
    w.add([(1.0, 61_500)], 0)
    assert w.newest_second == 61
    w.seed_second(61, 1.0, 1.0, 1.0, 5)
    w.seed_second(62, 1.0, 1.0, 1.0, 1)
    assert w.newest_second == 62
    w.seed_row(MinuteRow("ex", "BTC", 120_000, 1.0, 1.0, 1.0, 1))
    assert w.newest_second == 179
    w.seed_row(MinuteRow("ex", "BTC", 60_000, 1.0, 1.0, 1.0, 9))
    assert w.newest_second == 179


def test_dirty_seconds_carry_their_bucket_and_make_their_minute_pending() -> None:
    w = PairWindow("ex", "BTC")
    w.add([(2.0, 1_000), (1.0, 1_500), (3.0, 61_000)], 0)
    w.dirty_seconds.add(99)  # a second evicted meanwhile: skipped, the rest still taken
    got = sorted(w.take_dirty_seconds(), key=lambda b: b[2])
    assert got == [
        SecondBucket("ex", "BTC", 1, 1.0, 2.0, 3.0, 2),
        SecondBucket("ex", "BTC", 61, 3.0, 3.0, 3.0, 1),
    ]
    assert w.pending_minutes == {0, 60_000}
    assert w.dirty_seconds == set()
    assert w.take_dirty_seconds() == []


def test_minute_rows_keep_their_seconds_and_coverage() -> None:
    w = PairWindow("ex", "BTC")
    w.add([(2.0, 1_000), (1.0, 1_500), (4.0, 59_999), (9.0, 60_000), (7.0, 130_000)], 0)
    w.take_dirty_seconds()
    rows = w.closed_minutes(60_000 + 2_000 + 60_000, 2_000, {0: 60_000, 60_000: 70_000})
    assert rows == [
        MinuteRow("ex", "BTC", 0, 7.0 / 3, 1.0, 4.0, 3, 60_000,
                  ((1, 1.0, 2.0, 3.0, 2), (59, 4.0, 4.0, 4.0, 1))),
        MinuteRow("ex", "BTC", 60_000, 9.0, 9.0, 9.0, 1, 60_000, ((60, 9.0, 9.0, 9.0, 1),)),
    ]  # fmt: skip
    assert w.pending_minutes == {120_000}
    [last] = w.open_minutes({120_000: 5})
    assert (last.minute_ms, last.count, last.covered_ms) == (120_000, 1, 5)
    assert w.pending_minutes == set()


def test_closed_minutes_skips_open_ones_and_emits_later_closed_ones() -> None:
    w = PairWindow("ex", "BTC")
    w.add([(1.0, 0), (2.0, 60_000)], 0)
    w.pending_minutes = {0, 60_000, 180_000}  # 180 s: nothing held there, not yet closed
    rows = w.closed_minutes(124_000, 2_000)
    assert [r.minute_ms for r in rows] == [0, 60_000]
    assert [r.covered_ms for r in rows] == [None, None]
    assert w.pending_minutes == {180_000}


def test_a_minute_restored_from_an_older_format_row_is_emitted_whole_without_seconds() -> None:
    w = PairWindow("ex", "BTC")
    w.seed_row(MinuteRow("ex", "BTC", 60_000, 2.0, 1.0, 3.0, 3))
    assert w.minute_aggregate(60_000) is not None
    w.mark_pending(60_000)
    [row] = w.open_minutes()
    assert row == MinuteRow("ex", "BTC", 60_000, 2.0, 1.0, 3.0, 3, None, None)
    agg = w.minute_aggregate(60_000)
    assert agg is not None
    assert (agg.low, agg.high, agg.total, agg.count) == (1.0, 3.0, 6.0, 3)
    assert w.minute_aggregate(0) is None


def test_folded_seconds_give_the_window_what_single_ticks_give_it() -> None:
    batches = [
        [(2.0, 11_000), (3.0, 11_100), (1.0, 12_000)],
        [(1.0, 9_000), (5.0, 11_500), (5.0, 12_999), (4.0, 12_999)],  # a late tick, a tie
        [(4.0, 12_999), (0.5, 10_000)],  # same newest again: receipt time unchanged
        [(7.0, 13_000)],
    ]
    by_tick = PairWindow("ex", "BTC", floor_second=10)
    by_second = PairWindow("ex", "BTC", floor_second=10)
    for received, points in enumerate(batches):
        by_tick.add(points, received)
        # The parser's folded form of the same batch, written out literally.
        folded: dict[int, list[float]] = {}
        for price, ts in points:
            f = folded.get(ts // 1000)
            if f is None:
                folded[ts // 1000] = [price, price, price, 1, ts, price]
                continue
            f[0], f[1], f[2], f[3] = min(f[0], price), max(f[1], price), f[2] + price, f[3] + 1
            if ts >= f[4]:
                f[4], f[5] = ts, price
        for second, f in folded.items():
            by_second.add_second(second, f, received)
        assert by_second.seconds == by_tick.seconds
        assert by_second.latest() == by_tick.latest()
        assert (by_second.late, by_second.newest_second) == (by_tick.late, by_tick.newest_second)
        assert by_second.dirty_seconds == by_tick.dirty_seconds
    assert by_second.seconds == {
        10: (0.5, 0.5, 0.5, 1), 11: (2.0, 5.0, 10.0, 3), 12: (1.0, 5.0, 14.0, 4),
        13: (7.0, 7.0, 7.0, 1),
    }  # fmt: skip
    assert by_second.latest() == LatestPrice("ex", "BTC", 7.0, 13_000, 3)
    assert by_second.late == 1
