"""Property: the chunk parser keeps exactly the valid lines, whatever surrounds them.

The oracle decodes each line on its own, the way docs/protocols.md defines the feed: one
JSON object per line. The chunk fast path must never see more (or fewer) ticks than that.
"""

from __future__ import annotations

from collections import Counter

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.domain.ticks import MAX_PRICE, RejectCounts, Tick
from marketflow.settings import DEFAULT_PAIRS
from tests.unit.folding import expect_seconds

TS = 1_795_694_355_187
PAIRS = frozenset(DEFAULT_PAIRS)


def reference(line: bytes) -> Tick | str:
    """One line alone: its tick, or the reason it is refused."""
    try:
        o = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "bad_json"
    if not isinstance(o, dict):
        return "not_an_object"
    if not {"symbol", "price", "timestamp"} <= o.keys():
        return "missing_field"
    price, ts, symbol = o["price"], o["timestamp"], o["symbol"]
    if type(price) not in (int, float):
        return "price_missing" if price is None else "price_not_number"
    if not price > 0:
        return "price_not_positive"
    if price > MAX_PRICE:
        return "price_out_of_range"
    if type(ts) is not int or not 946_684_800_000 <= ts <= TS + 60_000:
        return "timestamp_invalid"
    if symbol not in PAIRS:
        return "unknown_symbol"
    return (symbol, float(price), ts)


EXTRA = st.sampled_from(
    [
        b"",
        b',"qty":1',
        b',"m":{"seq":1}',
        b',"x":{"y":[1,2]}',
        b',"s":"},{"',
        b',"note":"a b, c"',
        b',"a":[{"b":1},{"c":2}]',
    ]
)
TICK_LINES = st.builds(
    lambda sym, price, dt, extra, spaced: (
        b'{"symbol":"%s","price":%r,"timestamp":%d%s}' % (sym.encode(), price, TS - dt, extra)
    ).replace(b'":', b'": ' if spaced else b'":'),
    st.sampled_from([*DEFAULT_PAIRS, "XRPUSDT"]),
    st.one_of(
        st.floats(1e-6, 1e6),
        st.integers(1, 10**6),
        st.sampled_from([0.0, -1.5, 1e308, 2e12]),
    ),
    st.integers(0, 10_000),
    EXTRA,
    st.booleans(),
)
GARBAGE = st.one_of(
    st.sampled_from(
        [
            b"1,2",
            b"1",
            b'"x"',
            b"[1,2]",
            b"}{",
            b"{",
            b'{"a":1},{"b":2}',
            b'{"a":1},2',
            b'{"symbol":"BTCUSDT","price":1.5}',
            b'{"symbol":"BTCUSDT","price":"1.5","timestamp":%d}' % TS,
            b"null",
            b"0,0",
            b"0",
            b",0,",
            b'{"a":1,',
            b"]",
            b'"x"]',
            b"  ",
        ]
    ),
    st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b),
)


@st.composite
def chunks(draw: st.DrawFn) -> list[bytes]:
    """Lines (without newlines): valid ticks, garbage, torn ticks, two ticks on one line."""
    lines: list[bytes] = []
    # Mostly clean lines: one bad line among them decides which path the chunk takes.
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["tick"] * 5 + ["garbage", "torn", "two"]))
        if kind == "tick":
            lines.append(draw(TICK_LINES))
        elif kind == "garbage":
            lines.append(draw(GARBAGE))
        elif kind == "two":
            lines.append(draw(TICK_LINES) + b"," + draw(TICK_LINES))
        else:  # a line broken in two, losing the bytes between (often just a comma)
            whole = draw(TICK_LINES)
            commas = [i for i, c in enumerate(whole) if c == 0x2C]
            cut = draw(st.sampled_from(commas) | st.integers(1, len(whole) - 1))
            lost = draw(st.sampled_from([0, 1]) | st.integers(0, len(whole) - cut - 1))
            lines += [whole[:cut], whole[cut + lost :]]
    return lines


@settings(max_examples=400)
@given(chunks())
def test_valid_ticks_out_are_exactly_the_valid_lines(lines: list[bytes]) -> None:
    parser = JsonLinesParser("x", PAIRS, RejectCounts())
    expected = [reference(line.strip()) for line in lines if line.strip()]

    batch = parser.parse(b"\n".join(lines) + b"\n", TS)

    valid = [r for r in expected if isinstance(r, tuple)]
    assert batch.seconds() == expect_seconds(valid)  # arrival order kept: same sums, newest
    assert batch.count == len(valid)
    assert parser.rejects.counts == Counter(r for r in expected if isinstance(r, str))
