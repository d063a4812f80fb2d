"""Binance combined-stream frames -> ticks and top of book; every refused frame by reason."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketflow.adapters.feeds.ws_messages import (
    CombinedStreamParser,
    WsItem,
    decimal_reason,
    size_of,
)
from marketflow.domain.ticks import BookUpdate, RejectCounts

FIXTURES = Path(__file__).parent.parent / "fixtures" / "websocket"
RECEIVED = 1_795_482_633_200
T = 1_795_482_633_100
PAIRS = frozenset({"BTCUSDT", "DOGEUSDT", "ETHUSDT"})


def parser(max_price: float = 1e12) -> CombinedStreamParser:
    return CombinedStreamParser("wsvenue", PAIRS, RejectCounts(), max_price=max_price)


def trade(price: object = "100.5", symbol: object = "BTCUSDT", ts: object = T) -> str:
    data = {"e": "trade", "E": T, "s": symbol, "t": 1, "p": price, "q": "1", "T": ts}
    return orjson.dumps({"stream": "btcusdt@trade", "data": data}).decode()


def ticker(bid: object = "100.1", ask: object = "100.2", **extra: object) -> str:
    data = {"u": 1, "s": "BTCUSDT", "b": bid, "B": "3.5", "a": ask, "A": "4", **extra}
    return orjson.dumps({"stream": "btcusdt@bookTicker", "data": data}).decode()


def fixture(name: str) -> WsItem:
    return list((FIXTURES / name).read_text().splitlines())


def test_recorded_burst_gives_trades_as_ticks_and_the_last_quote_per_symbol() -> None:
    p = parser()
    batch = p.parse(fixture("binance_combined.jsonl"), RECEIVED)

    assert batch.by_symbol == {
        "BTCUSDT": [(99760.93770746, 1795482633070), (99761.5, 1795482633171)],
        "DOGEUSDT": [(0.3024408, 1795482633071)],
    }
    assert batch.count == 3
    # Two bookTickers of BTCUSDT in one burst: only the newest is published, at receipt time.
    assert batch.books == [
        BookUpdate("wsvenue", "BTCUSDT", 99761.4, 99761.6, RECEIVED, bid_size=2.0, ask_size=1.5)
    ]
    assert p.rejects.counts == {}  # the SUBSCRIBE reply is no reject


def test_unchanged_quote_is_not_published_again_a_changed_one_is() -> None:
    p = parser()
    first = p.parse([ticker()], RECEIVED)
    same = p.parse([ticker()], RECEIVED + 1)
    moved = p.parse([ticker(ask="100.3")], RECEIVED + 2)

    assert [(b.bid, b.ask) for b in first.books] == [(100.1, 100.2)]
    assert same.books == []
    assert [(b.bid, b.ask, b.timestamp_ms) for b in moved.books] == [(100.1, 100.3, RECEIVED + 2)]


def test_a_size_change_alone_is_a_change() -> None:
    p = parser()
    p.parse([ticker()], RECEIVED)
    batch = p.parse([ticker(B="9")], RECEIVED + 1)
    assert [(b.bid_size, b.ask_size) for b in batch.books] == [(9.0, 4.0)]


def test_sizes_left_out_are_none() -> None:
    frame = '{"stream":"btcusdt@bookTicker","data":{"s":"BTCUSDT","b":"1.5","a":"1.6"}}'
    [book] = parser().parse([frame], RECEIVED).books
    assert (book.bid, book.ask, book.bid_size, book.ask_size) == (1.5, 1.6, None, None)


@pytest.mark.parametrize(
    ("price", "reason"),
    [
        (100.5, "price_not_string"),  # a JSON number: the wrong type for this protocol
        (100, "price_not_string"),
        (True, "price_not_string"),
        ([1], "price_not_string"),
        (None, "price_missing"),
        ("NaN", "price_not_finite"),
        ("nan", "price_not_finite"),
        ("inf", "price_not_finite"),
        ("-Infinity", "price_not_finite"),
        ("1e999", "price_not_finite"),  # beyond a double
        ("-1", "price_not_positive"),
        ("0", "price_not_positive"),
        ("0.00000000", "price_not_positive"),
        ("2e12", "price_out_of_range"),
        ("", "price_not_decimal"),
        ("abc", "price_not_decimal"),
        (" 1", "price_not_decimal"),  # float() would take these three
        ("1_000", "price_not_decimal"),
        ("0x10", "price_not_decimal"),
        ("\u0661", "price_not_decimal"),  # ARABIC-INDIC DIGIT ONE: float() reads it as 1
    ],
)
def test_bad_trade_price_is_refused_with_its_reason(price: object, reason: str) -> None:
    p = parser()
    batch = p.parse([trade(price), trade("101")], RECEIVED)

    assert p.rejects.counts == {reason: 1}
    assert batch.by_symbol == {"BTCUSDT": [(101.0, T)]}  # the burst goes on
    assert batch.count == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"bid": 100.1}, "price_not_string"),
        ({"ask": "inf"}, "price_not_finite"),
        ({"bid": "-1"}, "price_not_positive"),
        ({"ask": None}, "price_missing"),
        ({"B": "-2"}, "size_invalid"),
        ({"A": 4}, "size_invalid"),
        ({"A": "NaN"}, "size_invalid"),
        ({"B": "1e999"}, "size_invalid"),
    ],
)
def test_bad_quote_is_refused_with_its_reason(fields: dict[str, object], reason: str) -> None:
    p = parser()
    bid, ask = fields.pop("bid", "100.1"), fields.pop("ask", "100.2")
    batch = p.parse([ticker(bid, ask, **fields)], RECEIVED)

    assert batch.books == []
    assert p.rejects.counts == {reason: 1}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (trade(symbol="XRPUSDT"), "unknown_symbol"),
        (trade(symbol=7), "missing_field"),
        (trade(ts="1795482633100"), "timestamp_invalid"),
        (trade(ts=1795482633.1), "timestamp_invalid"),
        (trade(ts=17954826331), "timestamp_invalid"),  # seconds, not ms
        (trade(ts=RECEIVED + 3_600_000), "timestamp_in_future"),
        ('{"stream":"btcusdt@depth","data":{"s":"BTCUSDT"}}', "unknown_stream"),
        ('{"stream":"btcusdt","data":{}}', "unknown_stream"),
        ('{"stream":"btcusdt@trade"', "bad_json"),
        ("not json at all", "bad_json"),
        ("[1,2]", "not_an_object"),
        ('"text"', "not_an_object"),
        ('{"code":2,"msg":"Invalid request","id":1}', "venue_error"),
        ('{"e":"trade","s":"BTCUSDT"}', "unknown_message"),  # a raw (non-combined) stream
        (b'{"stream":"btcusdt@trade"}', "non_text_frame"),
        (b"\x00\xff", "non_text_frame"),
    ],
)
def test_bad_frame_is_counted_by_reason_and_the_rest_of_the_burst_is_kept(
    frame: str | bytes, reason: str
) -> None:
    p = parser()
    batch = p.parse([frame, trade("101"), ticker()], RECEIVED)

    assert p.rejects.counts == {reason: 1}
    assert batch.count == 1
    assert len(batch.books) == 1


def test_max_price_comes_from_the_pipeline_settings() -> None:
    p = parser(max_price=1000.0)
    p.parse([trade("1000"), trade("1000.01")], RECEIVED)
    assert p.rejects.counts == {"price_out_of_range": 1}


def test_decimal_and_size_readers() -> None:
    assert decimal_reason("25.35190000", 1e12) == (25.3519, None)
    assert decimal_reason("1e3", 1e12) == (1000.0, None)
    assert decimal_reason(".5", 1e12) == (0.5, None)
    assert size_of("0.00000000") == (0.0, True)
    assert size_of(None) == (None, True)
    assert size_of("x") == (None, False)


class CarefulOnly(CombinedStreamParser):
    """The same parser without its fast path: every frame read field by field."""

    def _fast(self, *args: object) -> int | None:
        return None


# What float() takes and a plain decimal is not, and the edges of the decimal rules.
TRICKY = (" 1", "1 ", "\t2", "\x1c3", "1_0", "\u0661", "inf", "Infinity", "-inf", "nan",
          "1e999", "1e-999", "-0", "+1", "1.", ".5", "1e5", "0x1", "")  # fmt: skip
_TRICKY = st.sampled_from(TRICKY)
_DECIMALS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.floats().map(repr),
    st.floats(min_value=1e-9, max_value=1e13).map(lambda f: f"{f:.8f}"),
    st.text(alphabet="0123456789.eE+-_ \t\u0661nafiINF", max_size=8),
)
_VALUES = st.one_of(_TRICKY, _TRICKY, _DECIMALS, st.integers(), st.floats(), st.booleans(),
                    st.none())  # fmt: skip
_TS = st.one_of(
    st.integers(min_value=T - 10**12, max_value=T + 10**8),
    st.integers(),
    st.booleans(),
    st.floats(),
    st.just(str(T)),
)
_SYMBOLS = st.sampled_from(["BTCUSDT", "DOGEUSDT", "ETHUSDT", "XRPUSDT", ""])
_STREAMS = st.sampled_from(
    ["btcusdt@trade", "btcusdt@bookTicker", "x@depth", "trade", "a\\u0040b@trade", 'a\\"@trade']
)


@st.composite
def frames(draw: st.DrawFn) -> str | bytes:
    """A valid trade or bookTicker frame, then a few of its values (or its stream name, or
    its form) replaced by what a venue might send instead."""
    if draw(st.booleans()):
        stream = "btcusdt@trade"
        data: dict[str, object] = {"e": "trade", "s": "BTCUSDT", "p": "100.5", "T": T}
    else:
        stream = "btcusdt@bookTicker"
        data = {"u": 1, "s": "ETHUSDT", "b": "99.1", "B": "2.5", "a": "99.2", "A": "0"}
    for key in draw(st.sets(st.sampled_from(sorted(data)), max_size=2)):
        if draw(st.integers(0, 5)) == 0:
            del data[key]
        elif key == "T":
            data[key] = draw(_TS)
        elif key == "s":
            data[key] = draw(_SYMBOLS)
        else:
            data[key] = draw(_VALUES)
    if draw(st.integers(0, 4)) == 0:
        stream = draw(_STREAMS)
    # The stream name is pasted in raw, so escapes reach the parser as the venue sent them;
    # json, not orjson: it writes any int and NaN/Infinity (bad JSON the parser must refuse).
    text = f'{{"stream":"{stream}","data":{json.dumps(data)}}}'
    form = draw(st.sampled_from(["text"] * 8 + ["cut", "bytes"]))
    if form == "cut":
        return text[: draw(st.integers(0, len(text)))]
    return text.encode() if form == "bytes" else text


@settings(max_examples=400, deadline=None)
@given(st.lists(frames(), max_size=8))
def test_fast_path_accepts_exactly_what_the_careful_path_accepts(burst: WsItem) -> None:
    fast, careful = parser(), CarefulOnly("wsvenue", PAIRS, RejectCounts())
    a = fast.parse(burst, RECEIVED)
    b = careful.parse(burst, RECEIVED)
    assert (a.by_symbol, a.count, a.books) == (b.by_symbol, b.count, b.books)
    assert fast.rejects.counts == careful.rejects.counts


@pytest.mark.parametrize("value", TRICKY)
@pytest.mark.parametrize("key", ["p", "b", "a", "B", "A"])
def test_fast_path_agrees_on_every_tricky_decimal_in_every_field(key: str, value: str) -> None:
    frame = trade(value) if key == "p" else ticker(**{"bid": "1", "ask": "2", key: value})
    fast, careful = parser(), CarefulOnly("wsvenue", PAIRS, RejectCounts())
    a, b = fast.parse([frame], RECEIVED), careful.parse([frame], RECEIVED)
    assert (a.by_symbol, a.books) == (b.by_symbol, b.books)
    assert fast.rejects.counts == careful.rejects.counts
