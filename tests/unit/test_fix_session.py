"""The FIX initiator session state machine, driven with a fake transport and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from marketflow.adapters.fix.codec import FieldValue, FixFramer, encode, parse_fields
from marketflow.adapters.fix.session import (
    FixSession,
    FixSessionError,
    LinkDead,
    SessionConfig,
    SessionState,
)


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[dict[int, bytes]] = []
        self.raw: list[bytes] = []
        self._framer = FixFramer()

    def write(self, data: bytes, /) -> None:
        for frame in self._framer.feed(data):
            assert isinstance(frame, bytes)
            self.raw.append(frame)
            self.sent.append(dict(parse_fields(frame)))

    def types(self) -> list[bytes]:
        return [m[35] for m in self.sent]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SENT = "20250102-12:00:00.000"


def venue(
    msg_type: str,
    seq: int,
    fields: list[tuple[int, FieldValue]] | None = None,
    *,
    poss_dup: bool = False,
    orig: str | None = "20250102-11:59:59.000",
) -> bytes:
    """A message from the venue; a resend (``poss_dup``) carries 43=Y and 122 ``orig``."""
    head: list[tuple[int, FieldValue]] = []
    if poss_dup:
        head.append((43, "Y"))
        if orig is not None:
            head.append((122, orig))
    return encode(msg_type, head + (fields or []), sender="VENUE", target="MF", seq=seq,
                  sending_time=SENT)  # fmt: skip


def md(seq: int, *, poss_dup: bool = False) -> bytes:
    body: list[tuple[int, FieldValue]] = [(268, 1), (279, 0), (269, 2), (55, "BTCUSDT")]
    return venue("X", seq, [*body, (270, f"{seq}.5")], poss_dup=poss_dup)


def seqs(frames: list[bytes]) -> list[int]:
    return [int(dict(parse_fields(f))[34]) for f in frames]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(
    clock: FakeClock, hb: int = 10, *, next_out: int = 1, next_in: int = 1, **options: Any
) -> tuple[FixSession, FakeTransport]:
    transport = FakeTransport()
    config = SessionConfig("MF", "VENUE", ("BTCUSDT", "ETHUSDT"), heartbeat_s=hb, **options)
    session = FixSession(
        config, transport, monotonic=clock, wall_ms=lambda: 1_735_819_200_000,
        next_out=next_out, next_in=next_in,
    )  # fmt: skip
    return session, transport


def logged_on(clock: FakeClock, **options: Any) -> tuple[FixSession, FakeTransport]:
    session, transport = make(clock, **options)
    session.start()
    session.on_frame(venue("A", 1, [(98, 0), (108, 10)]))
    assert session.state is SessionState.ACTIVE
    return session, transport


def test_logon_then_market_data_request(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    logon, request = transport.sent
    assert (logon[35], logon[98], logon[108], logon[34]) == (b"A", b"0", b"10", b"1")
    assert 141 not in logon  # ResetOnLogon is off by default: numbers survive reconnects
    assert session.state is SessionState.ACTIVE
    assert request[35] == b"V"
    assert (request[263], request[264], request[265], request[146]) == (b"1", b"1", b"1", b"2")
    pairs = parse_fields(transport.raw[1])
    assert [v for t, v in pairs if t == 269] == [b"0", b"1", b"2"]
    assert [v for t, v in pairs if t == 55] == [b"BTCUSDT", b"ETHUSDT"]
    assert request[34] == b"2"


def test_market_data_is_handed_to_the_parser_in_sequence(clock: FakeClock) -> None:
    session, _ = logged_on(clock)
    session.on_frame(md(2))
    session.on_frame(md(3))
    assert seqs(session.take_market_data()) == [2, 3]
    assert session.take_market_data() == []
    assert session.expected_in_seq == 4


def test_heartbeat_sent_when_idle(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    clock.now += 5
    session.on_frame(venue("0", 2))
    session.poll()
    assert transport.types()[-1] == b"V"
    clock.now += 5
    session.on_frame(venue("0", 3))
    session.poll()
    assert transport.types()[-1] == b"0"


def test_test_request_answered_with_its_id(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(venue("1", 2, [(112, "PING-7")]))
    assert transport.sent[-1][35] == b"0"
    assert transport.sent[-1][112] == b"PING-7"


def test_silence_sends_test_request_then_declares_link_dead(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    clock.now += 12.5  # past 1.2 x HeartBtInt
    session.poll()
    assert b"1" in transport.types()
    assert session.stats.test_requests_sent == 1
    clock.now += 3
    session.poll()  # not dead yet (2 x HeartBtInt = 20 s), no second TestRequest
    assert session.stats.test_requests_sent == 1
    clock.now += 5
    with pytest.raises(LinkDead):
        session.poll()


def test_answer_to_test_request_keeps_the_link(clock: FakeClock) -> None:
    session, _ = logged_on(clock)
    clock.now += 12.5
    session.poll()
    session.on_frame(venue("0", 2, [(112, "TEST-2")]))
    clock.now += 10
    session.poll()  # 10 s since the answer: alive


def test_reject_and_md_request_reject_are_counted(clock: FakeClock) -> None:
    session, _ = logged_on(clock)
    session.on_frame(venue("3", 2, [(45, 2), (58, "bad")]))
    session.on_frame(venue("Y", 3, [(262, "MD-1"), (281, 0), (58, "unknown symbol")]))
    assert session.stats.venue_rejects == 1
    assert session.stats.md_request_rejects == 1
    assert set(session.rejects.counts) == {"venue_reject", "md_request_reject"}


def test_logout_waits_for_the_venue_answer(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.logout("shutdown")
    assert transport.sent[-1][35] == b"5"
    assert not session.closed
    session.on_frame(venue("5", 2))
    assert session.closed


def test_venue_logout_is_answered_and_raises(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    with pytest.raises(FixSessionError, match="logged out"):
        session.on_frame(venue("5", 2, [(58, "maintenance")]))
    assert transport.types()[-1] == b"5"


def test_logon_refused_and_logon_timeout(clock: FakeClock) -> None:
    session, _ = make(clock)
    session.start()
    with pytest.raises(FixSessionError, match="refused"):
        session.on_frame(venue("5", 1, [(58, "bad comp id")]))
    session, _ = make(clock)
    session.start()
    clock.now += 11
    with pytest.raises(LinkDead):
        session.poll()


def test_malformed_session_message_is_counted_not_raised(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(venue("4", 2, [(36, "abc")]))
    assert session.rejects.counts["sequence_reset_without_new_seq_no"] == 1
    reject = transport.sent[-1]
    assert (reject[35], reject[45], reject[371], reject[373]) == (b"3", b"2", b"36", b"6")
    session.on_frame(b"8=FIX.4.4\x019=5\x0135=0\x0110=000\x01")  # no MsgSeqNum
    assert session.rejects.counts["bad_header"] == 1
    assert session.expected_in_seq == 2


def _tags(raw: bytes) -> list[int]:
    return [tag for tag, _ in parse_fields(raw)]


def test_unsubscribe_carries_the_required_groups(clock: FakeClock) -> None:
    # Interop (QuickFIX 1.16 acceptor, FIX44.xml): MDReqGrp (267) is required in every 35=V,
    # 263=2 included; without it QuickFIX answers 35=3 "Required tag missing" (371=267) and
    # keeps the old subscription streaming next to the new one, so every trade came twice.
    session, transport = logged_on(clock, resend_timeout_s=5.0)
    session.on_frame(md(5))  # gap the venue never fills: the fallback re-subscribes
    clock.now += 6
    session.poll()
    cancel_raw, again_raw = transport.raw[-2:]
    for raw, request_type in ((cancel_raw, b"2"), (again_raw, b"1")):
        fields = parse_fields(raw)
        tags = [tag for tag, _ in fields]
        values = dict(fields)
        assert values[263] == request_type
        for required in (262, 263, 264, 267, 146):
            assert required in tags
        assert values[267] == b"3"
        assert [v for t, v in fields if t == 269] == [b"0", b"1", b"2"]
        assert [v for t, v in fields if t == 55] == [b"BTCUSDT", b"ETHUSDT"]
        # each group's count comes right before its entries
        assert tags[tags.index(267) + 1 : tags.index(267) + 4] == [269, 269, 269]
        assert tags[tags.index(146) + 1 : tags.index(146) + 3] == [55, 55]
    assert 265 not in _tags(cancel_raw)  # MDUpdateType only describes a subscription


def test_gap_fill_answers_resend_request_as_a_resend(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(venue("2", 2, [(7, 1), (16, 0)]))
    fill = transport.sent[-1]
    assert (fill[35], fill[34], fill[123], fill[36], fill[43]) == (b"4", b"1", b"Y", b"3", b"Y")
    assert fill[122] == fill[52]  # OrigSendingTime: required on a resend (FIX 4.4 vol. 2)
    tags = _tags(transport.raw[-1])
    assert tags[:7] == [8, 9, 35, 49, 56, 34, 52]
    assert tags.index(43) < tags.index(123)
    assert tags.index(122) < tags.index(123)
    assert session.next_out_seq == 3  # a gap fill does not use a sequence number
