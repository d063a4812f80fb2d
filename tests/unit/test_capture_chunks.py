"""Whole reads at once: the framer's inline path and the decoder's ``decode_many`` give exactly
what the per-message paths give, on the decoder fixtures and on torn, mixed streams."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from marketflow.adapters.capture.decoder import FixCaptureDecoder
from marketflow.adapters.fix import codec
from marketflow.adapters.fix.codec import FixFramer, FrameReject, encode
from marketflow.domain.capture import CapturedMessage, InvalidMessage
from tests.unit.test_capture import (
    BASE,
    FAST,
    PEER,
    REFERENCE_REJECTED,
    REFERENCE_VALID,
    frame,
    order,
)

FIXTURE_FRAMES = [
    *(frame(text) for text, _, _ in FAST),
    *(frame(raw) for raw, _, _ in REFERENCE_VALID),
    *(frame(text) for text, _ in REFERENCE_REJECTED),
    frame(BASE.replace("|34=1|", "|34=x|")),  # rejected by the fast path itself
    frame(BASE.replace("|55=AAPL|", "|55=A=B|")),  # a field with two "="
    frame("abc|" + BASE),  # not starting with "8="
    b"",
]

Decoded = tuple[list[CapturedMessage], list[tuple[str, bytes]]]


def one_at_a_time(frames: list[bytes]) -> Decoded:
    """The oracle: ``decode`` frame by frame, on a decoder of its own."""
    decoder = FixCaptureDecoder()
    out: list[CapturedMessage] = []
    bad: list[tuple[str, bytes]] = []
    for f in frames:
        try:
            out.append(decoder.decode(f, 1, PEER))
        except InvalidMessage as exc:
            bad.append((exc.reason, f))
    return out, bad


@pytest.mark.parametrize("f", FIXTURE_FRAMES)
def test_decode_many_of_one_fixture_frame_is_decode(f: bytes) -> None:
    assert FixCaptureDecoder().decode_many([f], 1, PEER) == one_at_a_time([f])


@settings(max_examples=300)
@given(st.lists(st.sampled_from(FIXTURE_FRAMES), max_size=8))
# A first field without "=" and a last frame without its SOH balance the counts over the
# joined text: only the framer-shape guards tell decode_many to go frame by frame.
@example([frame("abc|" + BASE), frame(BASE[:-1])])
# The other order: a frame cut short glues its last field to the next frame's first.
@example([frame(BASE[:-1]), frame("abc|" + BASE)])
def test_decode_many_of_mixed_fixture_frames_is_decode_per_frame(frames: list[bytes]) -> None:
    decoder = FixCaptureDecoder()
    for _ in range(2):  # shape cache cold, then warm
        assert decoder.decode_many(frames, 1, PEER) == one_at_a_time(frames)


def test_decode_many_takes_its_fast_path_for_a_plain_read() -> None:
    frames = [order(seq) for seq in range(1, 6)]
    messages, bad = FixCaptureDecoder().decode_many(frames, 1, PEER)
    assert bad == []
    assert [m.seq_num for m in messages] == [1, 2, 3, 4, 5]
    assert all(m.plain for m in messages)
    assert (messages, bad) == one_at_a_time(frames)


def test_decode_many_rejects_only_the_bad_frame_of_a_plain_read() -> None:
    bad_seq = order(2).replace(b"\x0134=2\x01", b"\x0134=x\x01")
    frames = [order(1), bad_seq, order(3)]
    messages, bad = FixCaptureDecoder().decode_many(frames, 1, PEER)
    assert [m.seq_num for m in messages] == [1, 3]
    assert bad == [("bad_seq_num: 'x'", bad_seq)]


_ODD = st.sampled_from(
    [
        b"8=FIX.4.2\x019=5\x01",  # a header with too short a body
        b"8=FIX.4.9\x019=12\x01",  # an unknown BeginString
        b"\x00\xffgarbage",
        b"8=FIX",
        order(9)[:-4] + b"000\x01",  # bad checksum
        order(9)[:40],  # cut short
        order(9).replace(b"9=", b"9=0", 1),  # BodyLength off by nothing but a zero pad
    ]
)
STREAM = st.lists(
    st.one_of(st.builds(order, st.integers(1, 10**6)), _ODD, st.binary(max_size=30)),
    max_size=10,
).map(b"".join)


@settings(max_examples=300)
@given(STREAM, st.lists(st.integers(0, 3000), max_size=12))
def test_inline_framing_equals_the_general_path_across_torn_reads(
    data: bytes, cuts: list[int]
) -> None:
    points = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    fast = FixFramer(512)
    got = [out for a, b in itertools.pairwise(points) for out in fast.feed(data[a:b])]
    head, codec._HEAD = codec._HEAD, re.compile(rb"(?!)")  # never matches: _one frames all
    try:
        slow = FixFramer(512)
        want = [out for a, b in itertools.pairwise(points) for out in slow.feed(data[a:b])]
    finally:
        codec._HEAD = head
    assert got == want
    assert fast.pending() == slow.pending()


@settings(max_examples=100)
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=30), st.lists(st.integers(0, 9000)))
def test_torn_reads_decode_to_the_same_messages_as_one_read(
    seqs: list[int], cuts: list[int]
) -> None:
    data = b"".join(order(s) for s in seqs)
    points = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    framer = FixFramer()
    decoder = FixCaptureDecoder()
    got: list[CapturedMessage] = []
    for a, b in itertools.pairwise(points):
        frames = [f for f in framer.feed(data[a:b]) if isinstance(f, bytes)]
        messages, bad = decoder.decode_many(frames, 1, PEER)
        assert bad == []
        got += messages
    assert [m.seq_num for m in got] == seqs
    assert got == one_at_a_time([order(s) for s in seqs])[0]


def test_a_long_message_is_checksummed_past_256_bytes() -> None:
    long = encode("D", [(58, "x" * 600)], sender="C", target="T", seq=1, sending_time="t")
    bad = long[:-4] + b"%03d\x01" % ((int(long[-4:-1]) + 1) % 256)
    assert FixFramer().feed(long + bad) == [long, FrameReject("bad_checksum", bad)]
