from marketflow.domain.window import PairWindow

T0 = 1_795_482_600_000  # a minute boundary


def test_min_max_sum_count_per_second_and_latest_by_exchange_time() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.add([(10.0, T0 + 10), (12.0, T0 + 20), (8.0, T0 + 999), (11.0, T0 + 1000)], T0)
    assert w.seconds[T0 // 1000] == (8.0, 12.0, 30.0, 3)
    assert w.seconds[T0 // 1000 + 1] == (11.0, 11.0, 11.0, 1)
    lp = w.latest()
    assert lp is not None
    assert (lp.price, lp.timestamp_ms) == (11.0, T0 + 1000)


def test_out_of_order_tick_does_not_replace_newer_latest() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.add([(11.0, T0 + 5000)], T0)
    w.add([(9.0, T0 + 1000)], T0)
    lp = w.latest()
    assert lp is not None
    assert lp.price == 11.0


def test_identical_ticks_in_same_millisecond_both_count() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.add([(10.0, T0), (10.0, T0)], T0)
    agg = w.period(T0 // 1000, T0 // 1000)
    assert agg is not None
    assert agg.count == 2


def test_minute_emitted_after_grace_and_reemitted_when_late_tick_changes_it() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.add([(10.0, T0 + 1), (20.0, T0 + 59_000)], T0)
    w.take_dirty_seconds()
    assert w.closed_minutes(T0 + 61_000, grace_ms=2000) == []
    rows = w.closed_minutes(T0 + 62_000, grace_ms=2000)
    assert [(r.minute_ms, r.average, r.low, r.high, r.count) for r in rows] == [
        (T0, 15.0, 10.0, 20.0, 2)
    ]
    assert w.closed_minutes(T0 + 63_000, grace_ms=2000) == []
    w.add([(30.0, T0 + 30_000)], T0 + 63_000)  # late, but within retention
    w.take_dirty_seconds()
    rows = w.closed_minutes(T0 + 63_100, grace_ms=2000)
    assert [(r.average, r.high, r.count) for r in rows] == [(20.0, 30.0, 3)]


def test_ticks_older_than_retention_are_counted_late_not_stored() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.add([(10.0, T0), (11.0, T0 + 700_000)], T0 + 700_000)
    w.take_dirty_seconds()
    w.closed_minutes(T0 + 800_000, 2000)
    w.evict(retention_s=300)
    assert w.period(0, T0 // 1000 + 1) is None  # the old second is gone
    w.add([(10.0, T0 + 1)], T0 + 700_000)
    assert w.late == 1
    assert w.period(0, T0 // 1000 + 1) is None


def test_retention_follows_exchange_time_so_an_old_replay_keeps_every_tick() -> None:
    w = PairWindow("ex", "BTCUSDT")
    day_ago = T0 - 86_400_000
    rows = []
    for minute in range(15):  # 15 minutes of old ticks, flushed as a replay would be
        ticks = [(1.0 + minute, day_ago + minute * 60_000 + 5_000),
                 (2.0 + minute, day_ago + minute * 60_000 + 59_999)]  # fmt: skip
        w.add(ticks, T0)
        w.take_dirty_seconds()
        rows += w.closed_minutes(T0, 2000)
        w.evict(retention_s=300)
    assert w.late == 0
    # Every tick is in its minute's row: none dropped by the eviction a day "later".
    assert [(r.minute_ms, r.count, r.low, r.high, r.average) for r in rows] == [
        (day_ago + m * 60_000, 2, 1.0 + m, 2.0 + m, 1.5 + m) for m in range(15)
    ]


def test_a_feed_catching_up_keeps_its_closed_minute_unpacked_until_it_moves_on() -> None:
    w = PairWindow("ex", "BTCUSDT")
    old = T0 - 600_000  # ten minutes behind the wall clock, arriving now
    rows = []
    for k in range(110):  # a backlog, one second per flush
        w.add([(100.0 + k, old + k * 1000)], T0 + k)
        w.take_dirty_seconds()
        rows += w.closed_minutes(T0 + k, 2000)
    # Every close wrote the minute as it stood (durable as soon as flushed) ...
    assert [r.count for r in rows if r.minute_ms == old] == list(range(1, 61))
    # ... but it was packed only once the feed was a minute past it: never reopened.
    assert (old in w.packed, old + 60_000 in w.packed) == (False, False)
    w.add([(1.0, old + 125_000)], T0 + 111)  # the feed moves a minute past the first
    w.take_dirty_seconds()
    w.closed_minutes(T0 + 111, 2000)
    assert (old in w.packed, old + 60_000 in w.packed) == (True, False)
    # Quiet for grace_ms: everything closed is packed.
    w.closed_minutes(T0 + 111 + 2000, 2000)
    assert old + 60_000 in w.packed


def test_pending_minute_is_not_evicted_before_it_is_emitted() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.add([(10.0, T0)], T0)
    w.take_dirty_seconds()
    w.add([(11.0, T0 + 700_000)], T0 + 700_000)
    w.evict(retention_s=300)
    assert w.open_minutes()[0].count == 1


def test_seeded_minute_base_is_merged_into_reemitted_row() -> None:
    from marketflow.domain.aggregates import MinuteRow

    w = PairWindow("ex", "BTCUSDT")
    w.seed_minute(MinuteRow("ex", "BTCUSDT", T0, 10.0, 5.0, 15.0, 4))
    w.add([(20.0, T0 + 50_000)], T0 + 50_000)
    w.take_dirty_seconds()
    (row,) = w.open_minutes()
    assert (row.count, row.low, row.high, row.average) == (5, 5.0, 20.0, 12.0)


def test_closed_minutes_are_packed_and_a_late_tick_reopens_its_minute_exactly() -> None:
    w = PairWindow("ex", "BTCUSDT")
    w.add([(10.0, T0 + 1_000), (12.0, T0 + 59_500), (20.0, T0 + 61_000)], T0)
    w.take_dirty_seconds()
    rows = w.closed_minutes(T0 + 62_000, 2_000)
    assert [r.minute_ms for r in rows] == [T0]
    assert set(w.packed) == {T0}  # the closed minute left the dict
    assert sorted(w.seconds) == [T0 // 1000 + 61]
    # Everything reads packed and open seconds alike.
    assert w.minute_row(T0, None) == rows[0]
    p = w.period(T0 // 1000 + 59, T0 // 1000 + 61)
    assert p is not None
    assert (p.low, p.high, p.total, p.count) == (12.0, 20.0, 32.0, 2)
    e = w.everything()
    assert e is not None
    assert (e.count, e.total) == (3, 42.0)
    assert w.minutes_held() == {T0, T0 + 60_000}
    assert w.oldest_minute_ms() == T0
    assert sorted(b.second for b in w.all_seconds()) == [T0 // 1000 + s for s in (1, 59, 61)]
    # A late tick for the packed minute: unpacked, folded, emitted again whole, packed again.
    w.add([(5.0, T0 + 1_200)], T0 + 63_000)
    assert w.packed == {}
    assert w.seconds[T0 // 1000 + 1] == (5.0, 10.0, 15.0, 2)
    w.take_dirty_seconds()
    again = w.closed_minutes(T0 + 63_000, 2_000)
    assert [(r.minute_ms, r.count, r.low, r.high) for r in again] == [(T0, 3, 5.0, 12.0)]
    assert set(w.packed) == {T0}
    # Eviction drops packed minutes like open ones.
    w.newest_second = T0 // 1000 + 60 + 600
    w.evict(600)
    assert w.packed == {}


def test_restored_seconds_of_closed_minutes_are_packed_at_the_next_close() -> None:
    w = PairWindow("ex", "BTCUSDT")
    assert w.seed_second(T0 // 1000 + 5, 1.0, 2.0, 3.0, 2)
    assert w.loose
    w.closed_minutes(T0 + 120_000, 2_000)  # not pending: nothing emitted, but packed
    assert set(w.packed) == {T0}
    assert w.seconds == {}
    assert not w.loose
    # Seeding a fuller version of a packed second unpacks its minute first.
    assert w.seed_second(T0 // 1000 + 5, 0.5, 2.0, 5.0, 3)
    assert w.seconds == {T0 // 1000 + 5: (0.5, 2.0, 5.0, 3)}
    assert w.packed == {}
    assert not w.seed_second(T0 // 1000 + 5, 1.0, 2.0, 3.0, 2)  # the older version loses
