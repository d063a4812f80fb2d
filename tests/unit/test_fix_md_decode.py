"""The lean FIX market-data path against simplefix: fixtures and generated messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import simplefix
from hypothesis import given, settings
from hypothesis import strategies as st

from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.fix.codec import FixFramer, FrameReject
from marketflow.adapters.fix.md_decode import ENTRY_TAGS, decode, decode_incremental
from marketflow.domain.ticks import RejectCounts, TickBatch

FIXTURES = Path(__file__).parent.parent / "fixtures" / "fix"
NOON = 1_735_819_200_000  # 2025-01-02T12:00:00Z
PAIRS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
Entry = tuple[bytes | None, ...]


def oracle(frame: bytes) -> tuple[bytes | None, bytes | None, list[Entry]]:
    """MsgType, SendingTime and the entries (ENTRY_TAGS, None when absent) by simplefix."""
    parser = simplefix.FixParser(allow_empty_values=True)
    parser.append_buffer(frame)
    msg = parser.get_message()
    assert msg is not None
    pairs = [(int(tag), bytes(value)) for tag, value in msg.pairs]
    tags = [tag for tag, _ in pairs]
    group = tags.index(268) if 268 in tags else len(tags)
    entries: list[dict[int, bytes]] = []
    body = [(t, v) for t, v in pairs[group + 1 :] if t != 10]
    for tag, value in body:
        if tag == body[0][0]:
            entries.append({})
        entries[-1][tag] = value
    as_tuples = [tuple(e.get(int(tag)) for tag in ENTRY_TAGS) for e in entries]
    return msg.get(35), msg.get(52), as_tuples


def fixture_frames() -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(FIXTURES.glob("*.fix")):
        out += [f for f in FixFramer().feed(path.read_bytes()) if isinstance(f, bytes)]
    return out


def assert_decodes_like_simplefix(frame: bytes) -> None:
    msg_type, sending, entries = oracle(frame)
    got_type, got_sending, _, got_entries = decode(frame)
    assert (got_type, got_sending, list(got_entries)) == (msg_type, sending, entries)
    fast = decode_incremental(frame)
    if fast is not None:  # the fast path reads 279 269 55 as one, 270, 273 (b"" if absent)
        assert (msg_type, fast[0]) == (b"X", sending)
        assert list(zip(*[iter(fast[1:])] * 3, strict=True)) == [
            (b"%s\x01269=%s\x0155=%s" % (e[0], e[1], e[2]), e[3], e[4] or b"") for e in entries
        ]


def test_fixtures_are_decoded_like_simplefix_and_incrementals_take_the_fast_path() -> None:
    frames = fixture_frames()
    assert len(frames) > 200
    for frame in frames:
        assert_decodes_like_simplefix(frame)
    incrementals = [f for f in frames if b"\x0135=X\x01" in f and b"\x01279=2" not in f]
    assert incrementals
    assert all(decode_incremental(f) is not None for f in incrementals)


class GeneralOnly(FixMarketDataParser):
    """The parser held to its general path (the rules every layout goes through)."""

    def _frames(self, frames: list[bytes], batch: TickBatch) -> None:
        for frame in frames:
            self._general(frame, batch)


def both_ways(frames: list[bytes]) -> tuple[TickBatch, dict[str, int], TickBatch, dict[str, int]]:
    """The parser as it runs, and the same parser held to its general path only."""
    fast = FixMarketDataParser("venue", PAIRS, RejectCounts())
    general = GeneralOnly("venue", PAIRS, RejectCounts())
    a = fast.parse(frames, NOON + 1000)
    b = general.parse(frames, NOON + 1000)
    return a, fast.rejects.counts, b, general.rejects.counts


def test_fixtures_give_the_same_ticks_books_and_rejects_on_both_paths() -> None:
    a, a_rejects, b, b_rejects = both_ways(fixture_frames())
    assert a.count > 200
    assert (a.by_symbol, a.books, a.count, a_rejects) == (b.by_symbol, b.books, b.count, b_rejects)


def _message(
    entries: list[list[tuple[int, str]]], sending: str, extra: list[tuple[int, str]]
) -> bytes:
    msg = simplefix.FixMessage()
    msg.append_pair(8, "FIX.4.4", header=True)
    msg.append_pair(35, "X", header=True)
    msg.append_pair(49, "VENUE", header=True)
    msg.append_pair(56, "MARKETFLOW", header=True)
    msg.append_pair(34, 7, header=True)
    msg.append_pair(52, sending, header=True)
    for tag, value in extra:
        msg.append_pair(tag, value)
    msg.append_pair(268, len(entries))
    for entry in entries:
        for tag, value in entry:
            msg.append_pair(tag, value)
    out: bytes = msg.encode()
    return out


PRICES = st.one_of(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False).map(str),
    st.sampled_from(["0", "-1", "1e5", "inf", "nan", "", ".", "1.2.3", "9" * 400, ".5", "7."]),
)
ENTRIES = st.builds(
    lambda action, kind, symbol, px, size, time, trade_id: [
        *([] if action is None else [(279, action)]),
        (269, kind),
        *([] if symbol is None else [(55, symbol)]),
        *([] if px is None else [(270, px)]),
        *([] if size is None else [(271, size)]),
        *([] if time is None else [(273, time)]),
        *([] if trade_id is None else [(1003, trade_id)]),
    ],
    st.one_of(st.none(), st.sampled_from(["0", "1", "2", "7", ""])),
    st.sampled_from(["0", "1", "2", "6"]),
    st.one_of(st.none(), st.sampled_from([*PAIRS, "XRPUSDT", "A=B"])),
    st.one_of(st.none(), PRICES),
    st.one_of(st.none(), st.just("0.5")),
    st.one_of(st.none(), st.sampled_from(["12:00:00.100", "11:59:59", "25:00:00", ""])),
    st.one_of(st.none(), st.sampled_from(["T1", "T2", "x=y"])),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(ENTRIES, min_size=1, max_size=4), min_size=1, max_size=4),
    st.sampled_from(["20250102-12:00:00.000", "20250102-12:00:00.500", "garbage"]),
    st.sampled_from([[], [(262, "MD-1")], [(55, "ETHUSDT")], [(58, "a=b")]]),
)
def test_generated_incrementals_decode_like_simplefix_and_parse_alike_on_both_paths(
    messages: list[list[list[tuple[int, str]]]], sending: str, extra: list[tuple[int, str]]
) -> None:
    frames = [_message(entries, sending, extra) for entries in messages]
    for frame in frames:
        assert_decodes_like_simplefix(frame)
    a, a_rejects, b, b_rejects = both_ways(frames)
    assert (a.by_symbol, a.books, a.count, a_rejects) == (b.by_symbol, b.books, b.count, b_rejects)


def lean_path(*reads: bytes) -> tuple[TickBatch, dict[str, int]]:
    """What the FIX feed does with bytes read: frame, count what is refused, parse the rest."""
    rejects = RejectCounts()
    frames: list[bytes] = []
    framer = FixFramer()
    for item in [item for data in reads for item in framer.feed(data)]:
        if isinstance(item, FrameReject):
            rejects.add(item.reason, item.raw)
        else:
            frames.append(item)
    batch = FixMarketDataParser("venue", PAIRS, rejects).parse(frames, NOON + 1000)
    return batch, rejects.counts


def incremental(price: str, seq: int = 1) -> bytes:
    entries = [[(279, "0"), (269, "2"), (55, "BTCUSDT"), (270, price), (273, "12:00:00.100")]]
    return _message(entries, "20250102-12:00:00.100", [(34, str(seq))])


def test_bad_checksum_is_refused_and_counted_and_the_next_message_kept() -> None:
    bad = incremental("10")[:-4] + b"000\x01"
    batch, rejects = lean_path(bad + incremental("11"))
    assert rejects == {"bad_checksum": 1}
    assert batch.by_symbol == {"BTCUSDT": [(11.0, NOON + 100)]}


def test_bad_body_length_is_refused_and_counted() -> None:
    good = incremental("10")
    longer = good.replace(b"\x019=", b"\x019=1", 1)  # BodyLength 1xx: the trailer is not there
    shorter = good.replace(b"\x0152=", b"\x0152=0", 1)  # one byte more than BodyLength says
    batch, rejects = lean_path(shorter + good)
    assert rejects == {"bad_body_length": 1}
    assert batch.count == 1
    batch, rejects = lean_path(longer + good)
    assert rejects == {"truncated_message": 1}
    assert batch.count == 1


def test_torn_message_is_refused_and_the_next_one_kept() -> None:
    torn = incremental("10")[:-40]
    after = incremental("11")
    for reads, reason in [
        ((torn + after,), "bad_body_length"),  # its BodyLength ends inside the next message
        ((torn + after[:30], after[30:]), "truncated_message"),  # refused before that is read
    ]:
        batch, rejects = lean_path(*reads)
        assert rejects == {reason: 1}
        assert batch.by_symbol == {"BTCUSDT": [(11.0, NOON + 100)]}


@pytest.mark.parametrize("high", [False, True])
def test_long_messages_are_checksummed_exactly(high: bool) -> None:
    # Over 256 bytes (and over 515 of ASCII) one adler32 call could wrap: the framer must not.
    text = ("\xe9" if high else "e") * 600
    entries = [[(279, "0"), (269, "2"), (55, "BTCUSDT"), (270, "5"), (58, text)]]
    good = _message(entries, "20250102-12:00:00.100", [])
    batch, rejects = lean_path(good + good[:-4] + b"%03d\x01" % ((int(good[-4:-1]) + 1) % 256))
    assert rejects == {"bad_checksum": 1}
    assert batch.count == 1
