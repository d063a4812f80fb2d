"""Aggregate, MinuteRow and History with literal expectations (written for mutation testing:
each assertion pins one operator, bound or tie rule of marketflow/domain/aggregates.py)."""

from __future__ import annotations

from marketflow.domain.aggregates import Aggregate, History, MinuteRow


def agg(low: float, high: float, total: float, count: int, lo_ms: int, hi_ms: int) -> Aggregate:
    return Aggregate(low, high, total, count, lo_ms, hi_ms)


def fields(a: Aggregate | None) -> tuple[float, float, float, int, int, int] | None:
    return None if a is None else (a.low, a.high, a.total, a.count, a.low_ms, a.high_ms)


def test_average_is_total_over_count() -> None:
    assert Aggregate(1.0, 5.0, 9.0, 4).average == 2.25


def test_merge_takes_lower_low_higher_high_and_adds() -> None:
    a = agg(10.0, 20.0, 30.0, 2, 1000, 2000)
    a.merge(agg(5.0, 25.0, 40.0, 3, 3000, 4000))
    assert fields(a) == (5.0, 25.0, 70.0, 5, 3000, 4000)
    a.merge(agg(6.0, 24.0, 1.0, 1, 9000, 9000))  # neither lower nor higher: times kept
    assert fields(a) == (5.0, 25.0, 71.0, 6, 3000, 4000)


def test_merge_tie_keeps_the_newest_time_either_way_round() -> None:
    a = agg(5.0, 9.0, 14.0, 2, 1000, 1000)
    a.merge(agg(5.0, 9.0, 14.0, 2, 7000, 8000))
    assert (a.low_ms, a.high_ms) == (7000, 8000)
    a.merge(agg(5.0, 9.0, 14.0, 2, 2000, 3000))  # an older tie does not move them back
    assert (a.low_ms, a.high_ms) == (7000, 8000)


def test_merged_of_nothing_is_none_and_of_one_is_a_copy() -> None:
    assert Aggregate.merged([]) is None
    one = agg(1.0, 2.0, 3.0, 2, 10, 20)
    out = Aggregate.merged([one])
    assert fields(out) == (1.0, 2.0, 3.0, 2, 10, 20)
    assert out is not one
    assert out is not None
    out.merge(agg(0.5, 9.0, 9.5, 1, 30, 40))
    assert fields(one) == (1.0, 2.0, 3.0, 2, 10, 20)  # the part is not changed


def test_merged_sum_is_fsum_exact() -> None:
    parts = [agg(1.0, 1.0, v, 1, 0, 0) for v in (1e16, 1.0, -1e16, 1.0)]
    out = Aggregate.merged(parts)
    assert out is not None
    assert out.total == 2.0  # a running float sum gives 0.0 or 1.0 here
    assert out.count == 4
    assert (out.low, out.high) == (1.0, 1.0)


def test_merged_picks_extremes_across_many_parts() -> None:
    parts = [agg(3.0, 4.0, 7.0, 2, 1, 1), agg(2.0, 5.0, 7.0, 2, 2, 2), agg(2.5, 4.5, 7.0, 2, 3, 3)]
    assert fields(Aggregate.merged(parts)) == (2.0, 5.0, 21.0, 6, 2, 2)


def row(**kw: object) -> MinuteRow:
    base: dict[str, object] = {
        "exchange": "ex", "symbol": "BTC", "minute_ms": 120_000, "average": 2.5,
        "low": 1.0, "high": 4.0, "count": 4,
    }  # fmt: skip
    base.update(kw)
    return MinuteRow(**base)  # type: ignore[arg-type]


def test_minute_row_key_complete_and_aggregate() -> None:
    r = row()
    assert r.key == ("ex", "BTC", 120_000)
    assert r.complete is False  # covered_ms unknown
    assert row(covered_ms=59_999).complete is False
    assert row(covered_ms=60_000).complete is True
    assert fields(r.aggregate()) == (1.0, 4.0, 10.0, 4, 120_000, 120_000)


SECONDS = ((120, 1.0, 2.0, 3.0, 2), (150, 4.0, 4.0, 4.0, 1), (179, 0.5, 0.5, 0.5, 1))


def test_part_since_with_seconds_counts_from_that_second_on() -> None:
    r = row(seconds=SECONDS, average=7.5 / 4, low=0.5, high=4.0, count=4)
    assert fields(r.part_since(0)) == (0.5, 4.0, 7.5, 4, 179_000, 150_000)
    assert fields(r.part_since(120)) == (0.5, 4.0, 7.5, 4, 179_000, 150_000)
    assert fields(r.part_since(121)) == (0.5, 4.0, 4.5, 2, 179_000, 150_000)
    assert fields(r.part_since(150)) == (0.5, 4.0, 4.5, 2, 179_000, 150_000)
    assert fields(r.part_since(151)) == (0.5, 0.5, 0.5, 1, 179_000, 179_000)
    assert fields(r.part_since(179)) == (0.5, 0.5, 0.5, 1, 179_000, 179_000)
    assert r.part_since(180) is None


def test_part_since_without_seconds_is_the_whole_row_or_nothing() -> None:
    r = row()  # minute 120 s .. 179 s, no per-second parts
    assert fields(r.part_since(119)) == (1.0, 4.0, 10.0, 4, 120_000, 120_000)
    assert fields(r.part_since(120)) == (1.0, 4.0, 10.0, 4, 120_000, 120_000)
    assert r.part_since(121) is None


def test_of_copies_the_aggregate_and_the_extras() -> None:
    r = MinuteRow.of("ex", "ETH", 60_000, agg(1.0, 3.0, 6.0, 3, 0, 0), 42, SECONDS)
    assert (r.exchange, r.symbol, r.minute_ms) == ("ex", "ETH", 60_000)
    assert (r.average, r.low, r.high, r.count) == (2.0, 1.0, 3.0, 3)
    assert (r.covered_ms, r.seconds) == (42, SECONDS)
    plain = MinuteRow.of("ex", "ETH", 60_000, agg(1.0, 3.0, 6.0, 3, 0, 0))
    assert (plain.covered_ms, plain.seconds) == (None, None)


def test_history_add_partial_counts_rows_that_contribute() -> None:
    h = History(agg(10.0, 10.0, 10.0, 1, 5, 5), minutes=3, incomplete_minutes=1)
    rows = [
        row(seconds=SECONDS, average=7.5 / 4, low=0.5, high=4.0, count=4, covered_ms=60_000),
        row(minute_ms=180_000, covered_ms=30_000),  # starts after 150 s: whole
        row(minute_ms=60_000),  # starts before 150 s without seconds: nothing
    ]
    h.add_partial(rows, 150)
    assert fields(h.aggregate) == (0.5, 10.0, 24.5, 7, 179_000, 5)
    assert (h.minutes, h.incomplete_minutes) == (5, 2)


def test_history_add_partial_from_nothing() -> None:
    h = History(None)
    h.add_partial([row(minute_ms=60_000)], 150)
    assert (h.aggregate, h.minutes, h.incomplete_minutes) == (None, 0, 0)
    h.add_partial([row(covered_ms=60_000)], 0)
    assert fields(h.aggregate) == (1.0, 4.0, 10.0, 4, 120_000, 120_000)
    assert (h.minutes, h.incomplete_minutes) == (1, 0)
