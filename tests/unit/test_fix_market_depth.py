"""FIX market depth (264 > 1): price levels per side with sizes, by MDEntryPx and position."""

from __future__ import annotations

from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.fix.codec import encode
from marketflow.adapters.fix.session_messages import md_request
from marketflow.domain.ticks import BookUpdate, RejectCounts

NOON = 1_735_819_200_000  # 2025-01-02T12:00:00Z
SENDING = "20250102-12:00:00.000"
S = "BTCUSDT"


def parser(depth: int = 3) -> FixMarketDataParser:
    return FixMarketDataParser("venue", (S, "ETHUSDT"), RejectCounts(), depth=depth)


def snapshot(bids: list[tuple[str, str]], offers: list[tuple[str, str]]) -> bytes:
    fields: list[tuple[int, str | int]] = [(262, "MD-1"), (55, S)]
    fields.append((268, len(bids) + len(offers) + 1))
    for kind, side in ((0, bids), (1, offers)):
        for pos, (px, size) in enumerate(side, 1):
            fields += [(269, kind), (270, px), (271, size), (290, pos)]
    fields += [(269, 2), (270, "100.0"), (271, "1")]
    return encode("W", fields, sender="V", target="MF", seq=1, sending_time=SENDING)


def incremental(*entries: list[tuple[int, str | int]]) -> bytes:
    fields: list[tuple[int, str | int]] = [(268, len(entries))]
    for e in entries:
        fields += e
    return encode("X", fields, sender="V", target="MF", seq=2, sending_time=SENDING)


def level(action: int, kind: int, px: str | None, size: str | None = None, pos: int | None = None):  # type: ignore[no-untyped-def]
    e: list[tuple[int, str | int]] = [(279, action), (269, kind), (55, S)]
    if px is not None:
        e.append((270, px))
    if size is not None:
        e.append((271, size))
    if pos is not None:
        e.append((290, pos))
    return e


BOOK = snapshot([("100.0", "1"), ("99.5", "2"), ("99.0", "3")], [("101.0", "4"), ("101.5", "5")])


def test_snapshot_gives_levels_best_first_with_sizes() -> None:
    batch = parser().parse([BOOK], NOON)

    assert batch.books == [
        BookUpdate("venue", S, 100.0, 101.0, NOON, 1.0, 4.0,
                   ((100.0, 1.0), (99.5, 2.0), (99.0, 3.0)), ((101.0, 4.0), (101.5, 5.0))),
    ]  # fmt: skip
    assert batch.count == 0  # the snapshot's trade repeats the last one


def test_incremental_new_change_and_delete_by_price() -> None:
    p = parser()
    p.parse([BOOK], NOON)
    batch = p.parse(
        [incremental(level(1, 0, "99.5", "7"), level(2, 1, "101.0"), level(0, 1, "102.0", "1"),
                     [(279, 0), (269, 2), (55, S), (270, "100.5"), (271, "0.1")])],
        NOON,
    )  # fmt: skip

    [book] = batch.books
    assert book.bids == ((100.0, 1.0), (99.5, 7.0), (99.0, 3.0))
    assert book.asks == ((101.5, 5.0), (102.0, 1.0))
    assert (book.ask, book.ask_size) == (101.5, 5.0)
    assert batch.by_symbol == {S: [(100.5, NOON)]}  # trades still are ticks
    assert not p.rejects.counts


def test_a_better_level_pushes_the_worst_below_the_depth() -> None:
    p = parser(depth=3)
    p.parse([BOOK], NOON)
    [book] = p.parse([incremental(level(0, 0, "100.2", "9", pos=1))], NOON).books

    assert book.bids == ((100.2, 9.0), (100.0, 1.0), (99.5, 2.0))


def test_change_by_position_moves_the_level_and_delete_by_position() -> None:
    p = parser()
    p.parse([BOOK], NOON)
    [book] = p.parse([incremental(level(1, 0, "100.1", "2", pos=1))], NOON).books
    assert book.bids == ((100.1, 2.0), (99.5, 2.0), (99.0, 3.0))  # 100.0 was at position 1

    [book] = p.parse([incremental(level(2, 0, None, pos=2))], NOON).books
    assert book.bids == ((100.1, 2.0), (99.0, 3.0))


def test_an_unchanged_book_is_not_published_again() -> None:
    p = parser()
    p.parse([BOOK], NOON)
    assert p.parse([BOOK], NOON + 1000).books == []  # the re-subscription's snapshot
    assert p.parse([incremental(level(1, 0, "99.5", "2"))], NOON).books == []


def test_bad_size_or_position_is_counted_and_the_level_left_alone() -> None:
    p = parser()
    p.parse([BOOK], NOON)
    batch = p.parse(
        [incremental(level(1, 0, "99.5", "-1")), incremental(level(1, 0, "99.5", "x")),
         incremental(level(1, 0, "99.6", "1", pos=0))],
        NOON,
    )  # fmt: skip

    assert batch.books == []
    assert p.rejects.counts == {"size_negative": 1, "size_not_number": 1, "position_invalid": 1}


def test_depth_one_keeps_the_top_of_book_path() -> None:
    p = FixMarketDataParser("venue", (S,), RejectCounts())
    [book] = p.parse([snapshot([("100.0", "1")], [("101.0", "4")])], NOON).books

    assert book == BookUpdate("venue", S, 100.0, 101.0, NOON)  # sizes and levels: depth > 1


def test_the_subscription_asks_for_the_configured_depth() -> None:
    assert (264, 5) in md_request((S,), "MD-1", 1, 5)
    assert (264, 1) in md_request((S,), "MD-1", 1)


def test_a_new_snapshot_replaces_every_level() -> None:
    p = parser()
    p.parse([BOOK], NOON)
    [book] = p.parse([snapshot([("99.0", "1")], [("102.0", "2")])], NOON).books

    assert (book.bids, book.asks) == (((99.0, 1.0),), ((102.0, 2.0),))
