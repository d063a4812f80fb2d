"""The lean FIX codec against simplefix and against hostile framing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import simplefix

from marketflow.adapters.fix import codec
from marketflow.adapters.fix.codec import (
    FieldValue,
    FixFramer,
    FixParseError,
    FrameReject,
    checksum,
    encode,
    missing_header_tags,
    parse_fields,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "fix"
ALL = sorted(FIXTURES.glob("*.fix"))


def frames_of(data: bytes) -> list[bytes]:
    return [f for f in FixFramer().feed(data) if isinstance(f, bytes)]


def simplefix_pairs(data: bytes) -> list[list[tuple[int, bytes]]]:
    parser = simplefix.FixParser()
    parser.append_buffer(data)
    out = []
    while (msg := parser.get_message()) is not None:
        out.append([(int(tag), value) for tag, value in msg.pairs])
    return out


@pytest.mark.parametrize("path", [p for p in ALL if p.name != "bad_checksum.fix"], ids=str)
def test_lean_parser_matches_simplefix_on_fixtures(path: Path) -> None:
    data = path.read_bytes()
    frames = frames_of(data)
    assert b"".join(frames) == data
    assert [parse_fields(f) for f in frames] == simplefix_pairs(data)


def test_packet_of_many_messages_in_one_feed() -> None:
    out = FixFramer().feed((FIXTURES / "packet.fix").read_bytes())
    assert len(out) == 200
    assert all(isinstance(f, bytes) for f in out)


def test_message_split_at_every_point_gives_the_same_frame() -> None:
    data = (FIXTURES / "split.fix").read_bytes()
    for cut in range(1, len(data)):
        framer = FixFramer()
        assert framer.feed(data[:cut]) == []
        assert framer.feed(data[cut:]) == [data]
        assert framer.buffered == 0


def test_message_fed_byte_by_byte() -> None:
    data = (FIXTURES / "incrementals.fix").read_bytes()
    framer = FixFramer()
    out = [f for i in range(len(data)) for f in framer.feed(data[i : i + 1])]
    assert out == frames_of(data)


class CountingPattern:
    """Wraps a compiled pattern; adds up how many bytes each search is given to scan."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.scanned = 0

    def search(self, data: bytes, pos: int = 0) -> re.Match[bytes] | None:
        self.scanned += len(data) - pos
        return self.pattern.search(data, pos)


def long_message(body_bytes: int) -> bytes:
    """A message of short fields (many SOH bytes: each may end an embedded header)."""
    fields: list[tuple[int, FieldValue]] = [(58, "x")] * (body_bytes // 5)
    return encode("D", [(55, "AAPL"), *fields], sender="A", target="B", seq=1,
                  sending_time="20250102-12:00:00")  # fmt: skip


def test_message_trickled_byte_by_byte_is_scanned_once_not_once_per_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counting = CountingPattern(codec._EMBEDDED_HEADER)
    monkeypatch.setattr(codec, "_EMBEDDED_HEADER", counting)
    msg = long_message(8000)
    framer = FixFramer()

    out = [f for i in range(len(msg)) for f in framer.feed(msg[i : i + 1])]

    assert out == [msg]
    assert framer.buffered == 0
    # Each byte is looked at a bounded number of times (a header can straddle two reads).
    assert counting.scanned <= 10 * len(msg)


def test_trickled_message_is_held_whole_until_its_last_byte() -> None:
    msg = long_message(8000)
    framer = FixFramer()
    for i in range(len(msg) - 1):
        framer.feed(msg[i : i + 1])
        assert framer.buffered == i + 1
    assert framer.pending() == msg[:-1]
    assert framer.feed(msg[-1:]) == [msg]
    assert framer.pending() == b""


def test_header_inside_a_trickled_message_is_found_across_reads() -> None:
    msg = (FIXTURES / "logon.fix").read_bytes()
    cut = b"8=FIX.4.4\x019=999\x0135=X\x0155=BT"
    data = cut + msg
    framer = FixFramer()

    out = [f for i in range(len(data)) for f in framer.feed(data[i : i + 1])]

    assert out == [FrameReject("truncated_message", cut), msg]


@pytest.mark.parametrize("chunk", [1, 7, 25, 26, 27, 100])
def test_any_read_size_frames_like_one_read(chunk: int) -> None:
    msg = (FIXTURES / "logon.fix").read_bytes()
    big = long_message(300)
    data = b"8=FIX.4.4\x019=999\x0135=X\x0155=BT" + msg + big + b"8=FIX.4.4\x019=5000\x01" + msg
    framer = FixFramer(1024)

    out = [f for i in range(0, len(data), chunk) for f in framer.feed(data[i : i + chunk])]

    assert out == FixFramer(1024).feed(data)
    assert [f for f in out if isinstance(f, bytes)] == [msg, big, msg]


def test_bad_checksum_drops_only_that_message() -> None:
    out = FixFramer().feed((FIXTURES / "bad_checksum.fix").read_bytes())
    assert [type(f) for f in out] == [bytes, FrameReject, bytes]
    reject = out[1]
    assert isinstance(reject, FrameReject)
    assert reject.reason == "bad_checksum"
    assert reject.raw.endswith(b"10=000\x01")


def test_garbage_before_a_message_is_reported_and_skipped() -> None:
    msg = (FIXTURES / "logon.fix").read_bytes()
    out = FixFramer().feed(b"\x00\xffnoise8=FI" + msg)
    assert out[-1] == msg
    assert all(isinstance(r, FrameReject) for r in out[:-1])


def test_wrong_body_length_resynchronises_on_next_message() -> None:
    msg = (FIXTURES / "logon.fix").read_bytes()
    bad = msg.replace(b"9=76", b"9=70")
    out = FixFramer().feed(bad + msg)
    assert isinstance(out[0], FrameReject)
    assert out[0].reason == "bad_body_length"
    assert out[-1] == msg


def test_truncated_message_is_rejected_without_waiting_for_its_length() -> None:
    msg = (FIXTURES / "logon.fix").read_bytes()
    out = FixFramer().feed(b"8=FIX.4.4\x019=999\x0135=X\x0155=BT" + msg)
    assert out == [FrameReject("truncated_message", b"8=FIX.4.4\x019=999\x0135=X\x0155=BT"), msg]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"8=FIX.9.9\x019=5\x0135=0\x0110=000\x01", "bad_begin_string"),
        (b"8=FIX.4.4\x0135=0\x019=5\x0110=000\x01", "body_length_not_second"),
        (b"8=FIX.4.4\x019=x5\x0135=0\x0110=000\x01", "bad_body_length"),
    ],
)
def test_header_order_and_values_are_validated(data: bytes, reason: str) -> None:
    out = FixFramer().feed(data)
    assert isinstance(out[0], FrameReject)
    assert out[0].reason == reason


def test_body_length_above_maximum_is_rejected_at_once() -> None:
    framer = FixFramer(max_message_bytes=256)
    out = framer.feed(b"8=FIX.4.4\x019=100000\x0135=X\x01")
    assert isinstance(out[0], FrameReject)
    assert out[0].reason == "message_too_large"
    assert framer.buffered < 16


def test_garbage_without_a_start_never_grows_the_buffer() -> None:
    framer = FixFramer()
    for _ in range(100):
        framer.feed(b"x" * 10_000)
    assert framer.buffered == 0


def test_reset_forgets_a_partial_message() -> None:
    msg = (FIXTURES / "logon.fix").read_bytes()
    framer = FixFramer()
    framer.feed(msg[:30])
    framer.reset()
    assert framer.feed(msg) == [msg]


@pytest.mark.parametrize(
    "begin", ["FIX.4.0", "FIX.4.1", "FIX.4.2", "FIX.4.3", "FIX.4.4", "FIX.5.0SP2", "FIXT.1.1"]
)
def test_every_fix_version_is_framed(begin: str) -> None:
    msg = encode("D", [(55, "AAPL"), (54, 1)], begin=begin, sender="A", target="B", seq=1,
                 sending_time="20250102-12:00:00")  # fmt: skip
    assert FixFramer().feed(msg) == [msg]


def test_encode_matches_simplefix() -> None:
    ours = encode("X", [(268, 1), (270, 0.00001), (271, 2), (43, True)], sender="V",
                  target="MF", seq=7, sending_time="20250102-12:00:00.000")  # fmt: skip
    msg = simplefix.FixMessage()
    for tag, value in [(8, "FIX.4.4"), (35, "X"), (49, "V"), (56, "MF"), (34, "7")]:
        msg.append_pair(tag, value, header=True)
    msg.append_pair(52, "20250102-12:00:00.000", header=True)
    for tag, value in [(268, "1"), (270, "0.00001"), (271, "2"), (43, "Y")]:
        msg.append_pair(tag, value)
    assert ours == msg.encode()


def test_encode_refuses_non_finite_numbers() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode("X", [(270, float("inf"))], sender="V", target="M", seq=1, sending_time="x")


def test_checksum_is_sum_mod_256() -> None:
    assert checksum(b"\xff\x02") == 1


def test_parse_fields_rejects_malformed_fields() -> None:
    with pytest.raises(FixParseError):
        parse_fields(b"8=FIX.4.4\x01bad\x01")
    with pytest.raises(FixParseError):
        parse_fields(b"8=FIX.4.4\x01x1=2\x01")
    with pytest.raises(FixParseError):
        parse_fields(b"8=FIX.4.4\x0135=0")


def test_missing_header_tags() -> None:
    fields = parse_fields((FIXTURES / "logon.fix").read_bytes())
    assert missing_header_tags(fields) == []
    assert missing_header_tags([(35, b"D"), (49, b""), (52, b"x")]) == [49, 56, 34]
