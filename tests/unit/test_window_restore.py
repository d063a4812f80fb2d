"""PairWindow's restore and query edges with literal expectations (written for mutation
testing of marketflow/domain/window.py: seeding, older-format rows, bounds of the queries)."""

from __future__ import annotations

from marketflow.domain.aggregates import Aggregate, MinuteRow, SecondBucket
from marketflow.domain.window import PairWindow


def fields(a: Aggregate | None) -> tuple[float, float, float, int, int, int] | None:
    return None if a is None else (a.low, a.high, a.total, a.count, a.low_ms, a.high_ms)


def test_seed_second_fuller_version_wins_and_moves_the_newest_second() -> None:
    w = PairWindow("ex", "BTC", floor_second=100)
    assert w.seed_second(99, 1.0, 1.0, 1.0, 1) is False  # below the floor
    assert w.seed_second(130, 1.0, 1.0, 1.0, 0) is False  # no ticks
    assert w.seconds == {}
    assert w.seed_second(130, 2.0, 3.0, 5.0, 2) is True
    assert w.newest_second == 130
    assert w.seed_second(130, 9.0, 9.0, 9.0, 1) is False  # fewer ticks: older
    assert w.seed_second(130, 9.0, 9.0, 18.0, 2) is False  # as many: kept
    assert w.seconds[130] == (2.0, 3.0, 5.0, 2)
    assert w.seed_second(130, 1.0, 4.0, 7.0, 3) is True
    assert w.seconds[130] == (1.0, 4.0, 7.0, 3)
    assert w.seed_second(100, 5.0, 5.0, 5.0, 1) is True  # the floor itself is held
    assert w.newest_second == 130  # an older second does not move it back


def test_seed_second_is_refused_in_a_minute_restored_from_an_older_format_row() -> None:
    w = PairWindow("ex", "BTC")
    assert w.seed_row(MinuteRow("ex", "BTC", 120_000, 2.0, 1.0, 3.0, 5)) is False
    assert w.seed_second(150, 1.0, 1.0, 1.0, 9) is False
    assert w.seed_second(180, 1.0, 1.0, 1.0, 1) is True  # the next minute is not
    assert w.seconds == {180: (1.0, 1.0, 1.0, 1)}


def test_seed_row_with_seconds_merges_by_second_and_says_when_the_window_holds_more() -> None:
    w = PairWindow("ex", "BTC")
    w.seed_second(125, 7.0, 7.0, 7.0, 1)  # cached, not in the row
    row = MinuteRow(
        "ex", "BTC", 120_000, 2.0, 1.0, 3.0, 3,
        seconds=((121, 1.0, 3.0, 4.0, 2), (179, 2.0, 2.0, 2.0, 1)),
    )  # fmt: skip
    assert w.seed_row(row) is True  # 4 ticks held > 3 in the row: write it again
    assert w.seconds == {121: (1.0, 3.0, 4.0, 2), 125: (7.0, 7.0, 7.0, 1), 179: (2.0, 2.0, 2.0, 1)}
    assert w.newest_second == 179
    fresh = PairWindow("ex", "BTC")
    assert fresh.seed_row(row) is False  # holds exactly the row
    assert PairWindow("ex", "BTC", floor_second=121).seed_row(row) is False  # below the floor
    assert PairWindow("ex", "BTC", floor_second=121).seconds == {}


def test_seed_row_without_seconds_is_kept_whole_unless_the_cache_holds_as_many() -> None:
    row = MinuteRow("ex", "BTC", 120_000, 2.0, 1.0, 3.0, 3)
    w = PairWindow("ex", "BTC")
    w.seed_second(119, 8.0, 8.0, 8.0, 1)  # the minute before: untouched
    w.seed_second(130, 5.0, 5.0, 10.0, 2)  # 2 < 3: dropped for the row
    w.seed_second(180, 6.0, 6.0, 6.0, 1)  # the minute after: untouched
    assert w.seed_row(row) is False
    assert sorted(w.seconds) == [119, 180]
    assert fields(w.bases[120_000]) == (1.0, 3.0, 6.0, 3, 120_000, 120_000)
    assert w.newest_second == 180
    only = PairWindow("ex", "BTC")
    only.seed_row(row)
    assert only.newest_second == 179  # the row's last second
    cached = PairWindow("ex", "BTC")
    cached.seed_second(120, 1.0, 1.0, 1.0, 1)
    cached.seed_second(179, 1.0, 1.0, 2.0, 2)
    assert cached.seed_row(row) is True  # 3 cached ticks: newer than the row, rewrite it
    assert cached.bases == {}
    assert sorted(cached.seconds) == [120, 179]
    assert PairWindow("ex", "BTC", floor_second=121).seed_row(row) is False
    low_floor = PairWindow("ex", "BTC", floor_second=120)
    assert low_floor.seed_row(row) is False
    assert 120_000 in low_floor.bases  # at the floor: restored


def test_all_seconds_lists_every_second_held() -> None:
    w = PairWindow("ex", "BTC")
    w.add([(2.0, 1_000), (3.0, 1_500), (5.0, 61_000)], 0)
    got = sorted(w.all_seconds(), key=lambda b: b.second)
    assert got == [
        SecondBucket("ex", "BTC", 1, 2.0, 3.0, 5.0, 2),
        SecondBucket("ex", "BTC", 61, 5.0, 5.0, 5.0, 1),
    ]
    assert all(type(b.count) is int for b in got)


def test_oldest_minute_and_minutes_held() -> None:
    w = PairWindow("ex", "BTC")
    assert w.oldest_minute_ms() is None
    assert w.minutes_held() == set()
    w.add([(1.0, 185_000), (1.0, 250_000)], 0)
    assert w.oldest_minute_ms() == 180_000
    assert w.minutes_held() == {180_000, 240_000}
    w.seed_row(MinuteRow("ex", "BTC", 60_000, 2.0, 1.0, 3.0, 3))  # an older-format row
    assert w.oldest_minute_ms() == 60_000
    assert w.minutes_held() == {60_000, 180_000, 240_000}
    floored = PairWindow("ex", "BTC", floor_second=120)
    floored.add([(1.0, 250_000)], 0)
    assert floored.oldest_minute_ms() == 120_000  # the floor: minutes from it on are held
    above = PairWindow("ex", "BTC", floor_second=300)
    above.add([(1.0, 310_000)], 0)
    assert above.oldest_minute_ms() == 300_000


def test_period_counts_an_older_format_minute_only_when_wholly_inside() -> None:
    w = PairWindow("ex", "BTC")
    w.seed_row(MinuteRow("ex", "BTC", 120_000, 2.0, 1.0, 3.0, 3))  # seconds 120 .. 179
    w.add([(10.0, 180_500)], 0)
    whole = (1.0, 10.0, 16.0, 4, 120_000, 180_000)
    assert fields(w.period(120, 180)) == whole
    assert fields(w.period(0, 1000)) == whole
    assert fields(w.period(121, 180)) == (10.0, 10.0, 10.0, 1, 180_000, 180_000)
    assert fields(w.period(120, 178)) is None
    assert fields(w.period(120, 179)) == (1.0, 3.0, 6.0, 3, 120_000, 120_000)
    assert fields(w.period(180, 180)) == (10.0, 10.0, 10.0, 1, 180_000, 180_000)
    assert fields(w.period(181, 200)) is None
    assert fields(w.everything()) == whole
