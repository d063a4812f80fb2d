"""Property tests: the framer survives any bytes and never loses a valid message."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from marketflow.adapters.fix.codec import FieldValue, FixFramer, FrameReject, encode, parse_fields

# Fragments that look like FIX, so the generated garbage exercises the resync paths.
_TOKENS = st.sampled_from(
    [
        b"8=FIX.4.4\x01",
        b"8=FIX",
        b"9=12\x01",
        b"9=",
        b"\x01",
        b"10=",
        b"35=X\x01",
        b"8=FIXT.1.1\x01",
    ]
)
GARBAGE = st.lists(st.one_of(st.binary(max_size=40), _TOKENS), max_size=12).map(b"".join)


def _message(seq: int, price: str) -> bytes:
    fields: list[tuple[int, FieldValue]] = [(268, 1), (279, 0), (269, 2), (55, "BTCUSDT")]
    return encode("X", [*fields, (270, price)],
                  sender="V", target="MF", seq=seq, sending_time="20250102-12:00:00")  # fmt: skip


MESSAGES = st.lists(
    st.builds(_message, st.integers(1, 10**6), st.decimals(1, 10**6, places=4).map(str)),
    min_size=1,
    max_size=5,
)


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    framer = FixFramer(max_message_bytes=512)
    points = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    for a, b in itertools.pairwise(points):
        for out in framer.feed(data[a:b]):
            if isinstance(out, bytes):
                parse_fields(out)  # a frame that passed validation must split cleanly or raise
            else:
                assert isinstance(out, FrameReject)
        # The documented bound: one message limit plus the chunk being framed; once feed()
        # returns, what is held is one partial message, under the limit.
        assert framer.buffered <= 512 + (b - a)
        assert framer.buffered < 512
        assert len(framer.pending()) == framer.buffered


@settings(max_examples=300)
@given(GARBAGE, MESSAGES)
def test_valid_messages_after_garbage_are_never_lost(garbage: bytes, msgs: list[bytes]) -> None:
    out = FixFramer().feed(garbage + b"".join(msgs))
    frames = [f for f in out if isinstance(f, bytes)]
    assert frames[-len(msgs) :] == msgs


@settings(max_examples=300)
@given(GARBAGE, MESSAGES, st.lists(st.integers(0, 5000), max_size=20))
def test_split_points_do_not_change_the_frames(
    garbage: bytes, msgs: list[bytes], cuts: list[int]
) -> None:
    data = garbage + b"".join(msgs) + garbage + b"".join(msgs)
    whole = [f for f in FixFramer().feed(data) if isinstance(f, bytes)]
    framer = FixFramer()
    points = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    split = [
        f
        for a, b in itertools.pairwise(points)
        for f in framer.feed(data[a:b])
        if isinstance(f, bytes)
    ]
    assert split == whole
    assert whole[-len(msgs) :] == msgs
