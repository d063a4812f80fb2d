"""JsonLinesParser against recorded captures and hand-made bad lines, reason by reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.domain.ticks import RejectCounts
from marketflow.settings import DEFAULT_PAIRS
from tests.unit.folding import expect_seconds

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "json"
TS = 1795694355187


def parser() -> JsonLinesParser:
    return JsonLinesParser("exchange1", frozenset(DEFAULT_PAIRS), RejectCounts())


def line(price: str, symbol: str = "BTCUSDT", ts: int = TS) -> bytes:
    return b'{"symbol":"%s","price":%s,"timestamp":%d}\n' % (symbol.encode(), price.encode(), ts)


def test_clean_simulator_capture_parses_every_line() -> None:
    p = parser()
    data = (FIXTURES / "simulator_clean.jsonl").read_bytes()

    batch = p.parse(data, received_ms=TS)

    assert batch.count == 100
    assert p.rejects.total() == 0
    by_symbol: dict[str, int] = {}
    for (symbol, _), f in batch.seconds().items():
        by_symbol[symbol] = by_symbol.get(symbol, 0) + int(f[3])
    assert by_symbol == dict.fromkeys(DEFAULT_PAIRS, 20)
    assert batch.exchange == "exchange1"
    assert batch.received_ms == TS


def test_dirty_capture_keeps_good_lines_and_counts_each_bad_one_by_reason() -> None:
    p = parser()
    data = (FIXTURES / "dirty.jsonl").read_bytes()

    batch = p.parse(data, received_ms=TS)

    assert batch.seconds() == expect_seconds([
        ("BTCUSDT", 99911.91638241659, TS),
        ("ETHUSDT", 3050.5, TS),
        ("DOGEUSDT", 0.3, TS + 100),
        ("SOLUSDT", 200.0, TS + 100),
    ])  # fmt: skip
    assert p.rejects.counts == {
        "bad_json": 3,  # plain text, a truncated line, binary junk
        "price_not_finite": 1,  # 1e400: valid JSON, but no double
        "price_not_number": 2,  # a string, a boolean
        "price_missing": 1,
        "price_not_positive": 2,  # zero, negative
        "unknown_symbol": 1,
        "timestamp_invalid": 1,  # seconds, not milliseconds
        "missing_field": 1,
        "not_an_object": 1,
    }


@pytest.mark.parametrize(
    ("price", "reason"),
    [
        ('"100000.5"', "price_not_number"),
        ("true", "price_not_number"),
        ("false", "price_not_number"),
        ("null", "price_missing"),
        ("0", "price_not_positive"),
        ("0.0", "price_not_positive"),
        ("-1.5", "price_not_positive"),
        ("-3", "price_not_positive"),
        ("1e400", "price_not_finite"),  # orjson refuses it; the line is still a tick
        ("-1e999", "price_not_finite"),
        ("1e308", "price_out_of_range"),
        ("1000000000001", "price_out_of_range"),
        ("1" * 400, "price_not_finite"),  # beyond a double, as orjson says of 1e999
        ("1" * 5000, "price_not_finite"),  # more digits than int() takes from a str
        ("[1.0]", "price_not_number"),
        ('{"v":1}', "price_not_number"),
    ],
)
def test_bad_price_is_rejected_with_its_reason(price: str, reason: str) -> None:
    p = parser()

    batch = p.parse(line("100.0", "ETHUSDT") + line(price), TS)

    assert batch.count == 1  # the good line next to it survives
    assert p.rejects.counts == {reason: 1}
    assert p.rejects.samples[reason]


def test_prices_up_to_the_maximum_are_accepted_as_floats() -> None:
    p = parser()

    batch = p.parse(line("1e12") + line("999999999999") + line("42") + line("1e-300"), TS)

    prices = [1e12, 999999999999.0, 42.0, 1e-300]
    assert batch.seconds() == expect_seconds([("BTCUSDT", p, TS) for p in prices])
    assert all(type(v) is float for v in batch.seconds()[("BTCUSDT", TS // 1000)][:3])
    assert p.rejects.total() == 0


def test_two_prices_of_1e308_are_rejected_before_they_overflow_a_sum() -> None:
    p = parser()

    batch = p.parse(line("1e308") + line("1.7976931348623157e308") + line("1.5"), TS)

    assert batch.seconds() == expect_seconds([("BTCUSDT", 1.5, TS)])
    assert p.rejects.counts == {"price_out_of_range": 2}


def test_maximum_price_is_configurable() -> None:
    p = JsonLinesParser("x", frozenset(DEFAULT_PAIRS), RejectCounts(), max_price=100.0)

    batch = p.parse(line("100") + line("100.0") + line("100.5") + line("101"), TS)

    assert batch.seconds() == expect_seconds([("BTCUSDT", 100.0, TS), ("BTCUSDT", 100.0, TS)])
    assert p.rejects.counts == {"price_out_of_range": 2}


@pytest.mark.parametrize(
    "bad",
    [
        b'{"symbol":"BTCUSDT","price":NaN,"timestamp":%d}' % TS,  # not JSON at all
        b'{"symbol":"BTCUSDT","price":Infinity,"timestamp":%d}' % TS,
        b'{"symbol":"BTCUSDT","price":1.5,"timestamp":%d,"x":1e999}' % TS,  # price is fine
        b'{"price":1e999,"timestamp":%d}' % TS,  # not a tick: no symbol
        b"[1e999]",
        b'{"symbol":"BTCUSDT","price":1e999,"timestamp":%d' % TS,  # truncated
    ],
)
def test_line_orjson_refuses_is_bad_json_unless_it_is_a_tick_with_a_huge_price(
    bad: bytes,
) -> None:
    p = parser()

    batch = p.parse(line("1.0") + bad + b"\n" + line("2.0"), TS)

    assert batch.count == 2
    assert p.rejects.counts == {"bad_json": 1}


def test_torn_line_next_to_a_two_value_line_is_not_one_tick() -> None:
    # The halves of a torn line join into one object when lines are joined with commas, and
    # "1,2" adds the value that keeps the count of values equal to the count of lines.
    p = parser()
    torn = line("7.5")
    cut = torn.index(b',"timestamp"')
    data = line("1.0") + torn[:cut] + b"\n" + torn[cut + 1 :] + b"1,2\n" + line("2.0")

    batch = p.parse(data, TS)

    assert batch.seconds() == expect_seconds([("BTCUSDT", 1.0, TS), ("BTCUSDT", 2.0, TS)])
    assert p.rejects.counts == {"bad_json": 3}


def test_line_torn_inside_a_string_next_to_a_two_value_line_is_not_one_tick() -> None:
    p = parser()
    head = b'{"symbol":"BTCUSDT","price":7.5,"timestamp":%d,"note":"a' % TS
    data = line("1.0") + head + b'\nb"}\n{"c":1},{"d":2}\n' + line("2.0")

    batch = p.parse(data, TS)

    assert batch.seconds() == expect_seconds([("BTCUSDT", 1.0, TS), ("BTCUSDT", 2.0, TS)])
    assert p.rejects.counts == {"bad_json": 3}


def test_torn_nested_line_next_to_two_objects_on_one_line_is_not_one_tick() -> None:
    # Every line starts with "{" and ends with "}", and every value is an object.
    p = parser()
    head = b'{"symbol":"BTCUSDT","price":7.5,"timestamp":%d,"x":[{"a":1}' % TS
    data = line("1.0") + head + b'\n{"b":2}]}\n{"c":1},{"d":2}\n' + line("2.0")

    batch = p.parse(data, TS)

    assert batch.seconds() == expect_seconds([("BTCUSDT", 1.0, TS), ("BTCUSDT", 2.0, TS)])
    assert p.rejects.counts == {"bad_json": 3}


def test_unknown_fields_are_ignored() -> None:
    p = parser()
    data = b'{"qty":1,"symbol":"SOLUSDT","x":{"y":[1,2]},"price":201.5,"timestamp":%d}\n' % TS

    batch = p.parse(data, TS)

    assert batch.seconds() == expect_seconds([("SOLUSDT", 201.5, TS)])


def test_crlf_blank_lines_and_missing_final_newline() -> None:
    p = parser()
    data = b"\r\n\n" + line("1.5").replace(b"\n", b"\r\n") + b"\n\n  \r\n" + line("2.5")[:-1]

    batch = p.parse(data, TS)

    assert batch.seconds() == expect_seconds([("BTCUSDT", 1.5, TS), ("BTCUSDT", 2.5, TS)])
    assert p.rejects.total() == 0


def test_empty_chunk_is_an_empty_batch() -> None:
    assert parser().parse(b"\n\r\n", TS).count == 0


@pytest.mark.parametrize("garbage", [b"not json", b"{", b"}{", b"\xff\xfe", b'{"symbol":'])
def test_garbage_line_is_counted_and_skipped(garbage: bytes) -> None:
    p = parser()

    batch = p.parse(line("1.0") + garbage + b"\n" + line("2.0"), TS)

    assert batch.count == 2
    assert p.rejects.counts == {"bad_json": 1}
    assert p.rejects.samples["bad_json"] == garbage


def test_timestamp_must_be_integer_epoch_milliseconds() -> None:
    p = parser()
    bad = [
        b'{"symbol":"BTCUSDT","price":1.0,"timestamp":"%d"}\n' % TS,
        b'{"symbol":"BTCUSDT","price":1.0,"timestamp":%d.5}\n' % TS,
        b'{"symbol":"BTCUSDT","price":1.0,"timestamp":%d}\n' % (TS * 1000),
        b'{"symbol":"BTCUSDT","price":1.0,"timestamp":true}\n',
    ]

    batch = p.parse(b"".join(bad), TS)

    assert batch.count == 0
    assert p.rejects.counts == {"timestamp_invalid": 4}


def test_timestamp_far_ahead_of_receipt_is_rejected_but_small_skew_is_not() -> None:
    p = parser()
    data = line("1.0", ts=TS + 30_000) + line("2.0", ts=TS + 3_600_000) + line("3.0", ts=TS - 1)

    batch = p.parse(data, TS)

    assert batch.seconds() == expect_seconds(
        [("BTCUSDT", 1.0, TS + 30_000), ("BTCUSDT", 3.0, TS - 1)]
    )
    assert p.rejects.counts == {"timestamp_in_future": 1}


def test_identical_ticks_in_one_millisecond_all_count() -> None:
    p = parser()

    batch = p.parse(line("5.0") * 3, TS)

    assert batch.seconds() == {("BTCUSDT", TS // 1000): [5.0, 5.0, 15.0, 3, TS, 5.0]}
    assert batch.count == 3


def test_symbol_of_wrong_type_is_unknown_symbol() -> None:
    p = parser()
    data = (
        b'{"symbol":["BTCUSDT"],"price":1.0,"timestamp":%d}\n' % TS
        + b'{"symbol":null,"price":1.0,"timestamp":%d}\n' % TS
    )

    p.parse(data, TS)

    assert p.rejects.counts == {"unknown_symbol": 2}
