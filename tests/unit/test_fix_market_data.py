"""FIX market-data frames -> ticks and top of book, from the recorded fixtures."""

from __future__ import annotations

from pathlib import Path

from marketflow.adapters.feeds.fix_market_data import FixItem, FixMarketDataParser
from marketflow.adapters.fix.codec import FixFramer, encode
from marketflow.domain.ticks import BookUpdate, RejectCounts

FIXTURES = Path(__file__).parent.parent / "fixtures" / "fix"
NOON = 1_735_819_200_000  # 2025-01-02T12:00:00Z
PAIRS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def frames(name: str) -> list[bytes]:
    return [f for f in FixFramer().feed((FIXTURES / name).read_bytes()) if isinstance(f, bytes)]


def parser() -> FixMarketDataParser:
    return FixMarketDataParser("venue", PAIRS, RejectCounts())


def test_snapshot_sets_top_of_book_and_its_last_trade_is_not_a_tick() -> None:
    batch = parser().parse(frames("snapshot.fix"), NOON)
    assert batch.count == 0
    assert batch.books == [
        BookUpdate("venue", "BTCUSDT", 99999.5, 100000.5, NOON),
        BookUpdate("venue", "ETHUSDT", 3049.9, 3050.1, NOON),
    ]


def test_incremental_trades_are_ticks_dated_by_sending_time() -> None:
    p = parser()
    p.parse(frames("snapshot.fix"), NOON)
    batch = p.parse(frames("incrementals.fix"), NOON + 500)
    assert batch.by_symbol == {"BTCUSDT": [(100000.1, NOON + 100), (99999.9, NOON + 300)]}
    assert batch.count == 2
    assert [(b.bid, b.ask) for b in batch.books] == [
        (99999.6, 100000.4),
        (99999.7, 100000.3),
        (99999.8, 100000.2),
        (99999.8, None),  # 279=2 deleted the offer
    ]
    assert not p.rejects.counts


def test_many_entries_of_one_message_are_all_ticks() -> None:
    batch = parser().parse(frames("split.fix"), NOON)
    assert batch.by_symbol == {
        "SOLUSDT": [(200.0, NOON + 500), (200.1, NOON + 500), (200.2, NOON + 500)]
    }


def _x(*entries: list[tuple[int, str]], sending: str = "20250102-12:00:00.000") -> bytes:
    fields: list[tuple[int, str | int]] = [(268, len(entries))]
    for e in entries:
        fields += e
    return encode("X", fields, sender="V", target="MF", seq=1, sending_time=sending)


def trade(price: str, symbol: str = "BTCUSDT", **extra: str) -> list[tuple[int, str]]:
    e = [(279, "0"), (269, "2"), (55, symbol), (270, price)]
    return e + [(int(k[1:]), v) for k, v in extra.items()]


def test_bad_entries_are_counted_per_reason_and_the_good_ones_kept() -> None:
    p = parser()
    msg = _x(
        trade("0"), trade("-1"), trade("1e5"), trade("inf"), trade("nan"), trade("abc"),
        trade("9" * 400), trade("5", symbol="XRPUSDT"), trade("5", t273="25:00:00"),
        [(279, "0"), (269, "2"), (55, "BTCUSDT")], [(279, "7"), (269, "2"), (55, "BTCUSDT")],
        [(279, "0"), (269, "6"), (55, "BTCUSDT"), (270, "1")], trade("42.5"),
    )  # fmt: skip
    batch = p.parse([msg], NOON)
    assert batch.by_symbol == {"BTCUSDT": [(42.5, NOON)]}
    assert p.rejects.counts == {
        "price_not_positive": 2, "price_not_number": 4, "price_not_finite": 1,
        "unknown_symbol": 1, "timestamp_invalid": 1, "price_missing": 1,
        "bad_update_action": 1, "entry_type_unsupported": 1,
    }  # fmt: skip


def test_entry_time_before_midnight_sent_after_it_belongs_to_the_previous_day() -> None:
    msg = _x(trade("10", t273="23:59:59.900"), sending="20250103-00:00:00.100")
    batch = parser().parse([msg], NOON + 12 * 3_600_000 + 150)  # received just after sent
    assert batch.by_symbol["BTCUSDT"] == [(10.0, NOON + 12 * 3_600_000 - 100)]


def test_entry_stamped_far_ahead_of_our_clock_is_rejected() -> None:
    p = parser()
    msg = _x(trade("10"), sending="20250102-12:05:00.000")  # 5 minutes after receipt
    assert p.parse([msg], NOON).count == 0
    assert p.rejects.counts == {"timestamp_in_future": 1}


def test_message_without_sending_time_is_rejected() -> None:
    p = parser()
    msg = _x(trade("10"), sending="garbage")
    assert p.parse([msg], NOON).count == 0
    assert p.rejects.counts == {"sending_time_invalid": 1}


def test_trade_correction_and_cancel_are_counted_not_ticks() -> None:
    # Defect 8: a 269=2 entry with 279=1/2 (correction, cancel) was counted as a new tick.
    p = parser()
    correction = [(279, "1"), (269, "2"), (55, "BTCUSDT"), (270, "10.5")]
    cancel = [(279, "2"), (269, "2"), (55, "BTCUSDT")]  # a cancel needs no price
    batch = p.parse([_x(trade("10"), correction, cancel)], NOON)
    assert batch.by_symbol == {"BTCUSDT": [(10.0, NOON)]}
    assert p.rejects.counts == {"trade_correction": 1, "trade_cancel": 1}


def test_trades_are_deduplicated_by_trade_id_or_entry_id() -> None:
    p = parser()
    first = p.parse([_x(trade("10", t1003="T1"), trade("11", t278="E7"), trade("12"))], NOON)
    again = p.parse([_x(trade("10", t1003="T1"), trade("11", t278="E7"), trade("12"))], NOON)
    assert first.count == 3
    assert again.by_symbol == {"BTCUSDT": [(12.0, NOON)]}  # no id: cannot tell, kept
    assert p.rejects.counts == {"duplicate_trade": 2}
    other = p.parse([_x(trade("10", symbol="ETHUSDT", t1003="T1"))], NOON)
    assert other.count == 1  # ids are per symbol


def test_dedup_window_is_bounded() -> None:
    p = FixMarketDataParser("venue", PAIRS, RejectCounts(), dedup_window=2)
    for trade_id in ("A", "B", "C"):
        p.parse([_x(trade("10", t1003=trade_id))], NOON)
    assert p.parse([_x(trade("10", t1003="A"))], NOON).count == 1  # forgotten: counted
    assert p.parse([_x(trade("10", t1003="C"))], NOON).count == 0


def test_the_mark_of_an_item_is_on_its_batch() -> None:
    p = parser()
    assert p.parse(FixItem([_x(trade("10"))], 42), NOON).mark == 42
    assert p.parse(FixItem([], 43), NOON).mark == 43
    assert p.parse([_x(trade("10"))], NOON).mark is None  # a replayed log has no mark
