"""JSON lines carrying the venue's top of book (bid/ask, sizes) feed the world view."""

from __future__ import annotations

import pytest

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.domain.ticks import BookUpdate, RejectCounts
from marketflow.settings import DEFAULT_PAIRS

TS = 1795694355187


def parser() -> JsonLinesParser:
    return JsonLinesParser("exchange1", frozenset(DEFAULT_PAIRS), RejectCounts())


def line(extra: str = "", symbol: str = "BTCUSDT", price: str = "100.5", ts: int = TS) -> bytes:
    return b'{"symbol":"%s","price":%s,"timestamp":%d%s}\n' % (
        symbol.encode(), price.encode(), ts, extra.encode(),
    )  # fmt: skip


def test_plain_lines_carry_no_book_and_keep_the_fast_path() -> None:
    batch = parser().parse(line() + line(price="101"), TS)

    assert batch.books == []
    assert batch.folded  # the typed (fast) path folded them
    assert batch.count == 2


def test_bid_and_ask_become_the_last_quote_per_symbol_of_the_chunk() -> None:
    chunk = (
        line(',"bid":100.0,"ask":101.0')
        + line(',"bid":100.1,"ask":101.0,"bid_size":2,"ask_size":0.5', ts=TS + 1)
        + line(',"bid":3000,"ask":3001', symbol="ETHUSDT", price="3000.5")
        + line()  # no quote: the BTCUSDT quote stays the one before
    )
    p = parser()
    batch = p.parse(chunk, TS + 10)

    assert batch.books == [
        BookUpdate("exchange1", "BTCUSDT", 100.1, 101.0, TS + 1, 2.0, 0.5),
        BookUpdate("exchange1", "ETHUSDT", 3000.0, 3001.0, TS),
    ]
    assert batch.count == 4  # every line is still a tick
    assert p.rejects.total() == 0


def test_one_sided_quote() -> None:
    [book] = parser().parse(line(',"ask":101.0'), TS).books
    assert (book.bid, book.ask) == (None, 101.0)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (',"bid":-1,"ask":101', "bid_not_positive"),
        (',"bid":100,"ask":"101"', "ask_not_number"),
        (',"bid":true', "bid_not_number"),
        (',"bid":100,"ask":1e13', "ask_out_of_range"),
        (',"bid":100,"bid_size":-2', "bid_size_not_positive"),
    ],
)
def test_an_invalid_quote_rejects_the_line_like_a_bad_price(extra: str, reason: str) -> None:
    p = parser()
    batch = p.parse(line(extra) + line(',"bid":100.0,"ask":101.0', ts=TS + 5), TS + 10)

    assert p.rejects.counts == {reason: 1}
    assert batch.count == 1
    assert [b.timestamp_ms for b in batch.books] == [TS + 5]


def test_a_quote_of_an_unknown_symbol_is_rejected_as_the_tick_is() -> None:
    p = parser()
    batch = p.parse(line(',"bid":1.0,"ask":2.0', symbol="NOPEUSDT"), TS)

    assert batch.books == []
    assert p.rejects.counts == {"unknown_symbol": 1}


def _slow(p: JsonLinesParser, chunk: bytes) -> object:
    """The per-line path's answer for ``chunk`` (what the fast path must equal)."""
    batch = p._validate(p._decode_lines(chunk), TS)
    return batch.seconds(), batch.books, batch.count


def test_quoted_chunks_take_the_fast_path_with_the_per_line_answer() -> None:
    chunk = (
        line(',"bid":100.0,"ask":101.0')
        + line(',"ask":101.5', price="101", ts=TS + 1)  # the last quote of BTCUSDT
        + line(',"bid":3000,"ask":3001,"bid_size":2', symbol="ETHUSDT", price="3000.5")
        + line(price="102", ts=TS + 2)  # no quote: BTCUSDT's book stays the one before
        + line(',"bid":5.0', symbol="NOPEUSDT")  # unknown symbol: neither tick nor book
        + line(',"bid":9.0', ts=TS + 999_999)  # ahead of the clock: refused, quote too
    )
    p = parser()
    batch = p.parse(chunk, TS)
    assert batch.folded  # the typed path, not the per-line one
    assert batch.books == [
        BookUpdate("exchange1", "BTCUSDT", None, 101.5, TS + 1),
        BookUpdate("exchange1", "ETHUSDT", 3000.0, 3001.0, TS, 2.0, None),
    ]
    assert (batch.seconds(), batch.books, batch.count) == _slow(parser(), chunk)
    assert p.rejects.counts == {"unknown_symbol": 1, "timestamp_in_future": 1}


@pytest.mark.parametrize("extra", [',"bid":-1', ',"ask":true', ',"bid":"1"', ',"bid_size":0'])
def test_a_bad_quote_in_a_chunk_costs_only_its_line(extra: str) -> None:
    chunk = line(',"bid":100.0') + line(extra, ts=TS + 1) + line(',"ask":101.0', ts=TS + 2)
    batch = parser().parse(chunk, TS)
    assert batch.count == 2
    assert (batch.seconds(), batch.books, batch.count) == _slow(parser(), chunk)
