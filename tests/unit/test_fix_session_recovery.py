"""Sequence numbers and gap recovery of the FIX session, after QuickFIX's acceptance scripts.

Each ``test_qf_*`` follows one script of quickfix/quickfix ``test/definitions/server/fix44``
(2b, 2c, 2e, 2f, 2g, 10_*, 11a-c) with the venue's messages driven into our sans-IO session;
the rest pin down issue 9's defects 7 and 8 and the recovery rules around them.
"""

from __future__ import annotations

import pytest

from marketflow.adapters.fix.session import FixSessionError, SessionState
from tests.unit.test_fix_session import FakeClock, logged_on, make, md, seqs, venue


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_qf_2b_too_high_asks_for_a_resend_and_applies_everything_in_order(
    clock: FakeClock,
) -> None:
    session, transport = logged_on(clock)
    for seq in (2, 3, 4):
        session.on_frame(md(seq))
    session.on_frame(md(10))
    request = transport.sent[-1]
    assert (request[35], request[7], request[16]) == (b"2", b"5", b"0")
    assert session.recovering
    assert session.held == 1
    assert session.expected_in_seq == 5  # the mark does not pass the gap
    assert seqs(session.take_market_data()) == [2, 3, 4]
    session.on_frame(md(11))  # live data keeps arriving: held too, no second request
    assert [m[35] for m in transport.sent].count(b"2") == 1
    for seq in range(5, 10):
        session.on_frame(md(seq, poss_dup=True))
    assert seqs(session.take_market_data()) == [5, 6, 7, 8, 9, 10, 11]
    assert session.expected_in_seq == 12
    assert not session.recovering
    assert session.held == 0
    assert (session.stats.gaps, session.stats.gaps_recovered) == (1, 1)
    assert session.stats.resends_applied == 5
    assert "seq_gap" not in session.rejects.counts  # nothing was lost


def test_qf_2c_too_low_without_poss_dup_logs_out(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    for seq in (2, 3, 4):
        session.on_frame(venue("0", seq))
    with pytest.raises(FixSessionError, match="too low"):
        session.on_frame(venue("0", 2))
    logout = transport.sent[-1]
    assert logout[35] == b"5"
    assert logout[58] == b"MsgSeqNum too low, expecting 5 but received 2"


def test_qf_2e_poss_dup_already_received_is_ignored_not_received_is_applied(
    clock: FakeClock,
) -> None:
    session, _ = logged_on(clock)
    session.on_frame(md(2))
    session.on_frame(md(2, poss_dup=True))
    session.on_frame(md(3, poss_dup=True))
    assert seqs(session.take_market_data()) == [2, 3]
    assert session.stats.duplicates == 1
    assert session.expected_in_seq == 4


def test_qf_2f_orig_sending_time_after_sending_time_rejects_and_logs_out(
    clock: FakeClock,
) -> None:
    session, transport = logged_on(clock)
    session.on_frame(md(2))
    session.on_frame(md(3))
    late = venue("X", 2, [(268, 0)], poss_dup=True, orig="20250102-12:00:10.000")
    with pytest.raises(FixSessionError):
        session.on_frame(late)
    reject, logout = transport.sent[-2:]
    assert (reject[35], reject[45], reject[372], reject[373]) == (b"3", b"2", b"X", b"10")
    assert logout[35] == b"5"


def test_qf_2g_poss_dup_without_orig_sending_time_is_rejected_not_counted(
    clock: FakeClock,
) -> None:
    session, transport = logged_on(clock)
    session.on_frame(md(2))
    session.on_frame(md(3))
    session.on_frame(venue("X", 2, [(268, 0)], poss_dup=True, orig=None))
    reject = transport.sent[-1]
    assert (reject[35], reject[45], reject[371], reject[373]) == (b"3", b"2", b"122", b"1")
    session.on_frame(venue("1", 4, [(112, "HELLO")]))  # the number did not move
    assert (transport.sent[-1][35], transport.sent[-1][112]) == (b"0", b"HELLO")
    assert session.state is SessionState.ACTIVE


def test_qf_2g_at_the_expected_number_a_resend_without_122_does_not_count(
    clock: FakeClock,
) -> None:
    session, _ = logged_on(clock)
    session.on_frame(venue("X", 2, [(268, 0)], poss_dup=True, orig=None))
    assert session.expected_in_seq == 2
    assert session.rejects.counts["poss_dup_without_orig_sending_time"] == 1


def test_qf_10_gap_fill_at_the_expected_number_moves_it(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(venue("4", 2, [(36, 20), (123, "Y")]))
    assert session.expected_in_seq == 20
    session.on_frame(venue("1", 20, [(112, "HELLO")]))
    assert transport.sent[-1][112] == b"HELLO"


def test_qf_10_gap_fill_above_the_expected_number_is_a_gap_itself(clock: FakeClock) -> None:
    # Defect 7: a GapFill's own MsgSeqNum was never checked.
    session, transport = logged_on(clock)
    session.on_frame(venue("4", 10, [(36, 20), (123, "Y")]))
    assert session.expected_in_seq == 2
    request = transport.sent[-1]
    assert (request[35], request[7], request[16]) == (b"2", b"2", b"0")
    session.on_frame(venue("4", 2, [(36, 10), (123, "Y")], poss_dup=True))  # fills 2..9
    assert session.expected_in_seq == 20  # then the held GapFill at 10 applies


def test_qf_10_gap_fill_below_the_expected_number(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(venue("4", 1, [(36, 20), (123, "Y")], poss_dup=True))  # ignored
    assert session.expected_in_seq == 2
    session.on_frame(venue("1", 2, [(112, "HELLO")]))
    assert transport.sent[-1][112] == b"HELLO"
    with pytest.raises(FixSessionError, match="expecting 3 but received 1"):
        session.on_frame(venue("4", 1, [(36, 20), (123, "Y")]))


def test_qf_11a_reset_to_a_higher_number_is_not_sequenced(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(venue("4", 0, [(36, 25)]))
    assert session.expected_in_seq == 25
    session.on_frame(venue("4", 0, [(36, 50), (123, "N")]))
    assert session.expected_in_seq == 50
    assert b"2" not in [m[35] for m in transport.sent]  # no gap, no resend


def test_qf_11b_reset_to_the_expected_number_changes_nothing(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    sent = len(transport.sent)
    session.on_frame(venue("4", 0, [(36, 2)]))
    assert session.expected_in_seq == 2
    assert len(transport.sent) == sent


def test_qf_11c_reset_to_a_lower_number_is_rejected_and_ignored(clock: FakeClock) -> None:
    # Defect 7: a reset could lower the expected number, so a resent trade counted twice.
    session, transport = logged_on(clock)
    session.on_frame(md(2))
    session.on_frame(md(3))
    session.on_frame(venue("4", 0, [(36, 1)]))
    reject = transport.sent[-1]
    assert (reject[35], reject[45], reject[372], reject[373]) == (b"3", b"0", b"4", b"5")
    assert session.expected_in_seq == 4
    session.on_frame(venue("4", 0, [(36, 1), (123, "N")]))
    assert session.expected_in_seq == 4
    with pytest.raises(FixSessionError):
        session.on_frame(md(2))  # the trade is not counted again: the session ends instead
    assert seqs(session.take_market_data()) == [2, 3]
    assert session.rejects.counts["sequence_reset_lower"] == 2


def test_sequence_reset_without_new_seq_no_is_rejected_not_zero(clock: FakeClock) -> None:
    # Defect 7: a missing tag 36 set the expected number to 0.
    session, transport = logged_on(clock)
    session.on_frame(venue("4", 0, []))
    reject = transport.sent[-1]
    assert (reject[35], reject[371], reject[373]) == (b"3", b"36", b"1")
    assert session.expected_in_seq == 2
    session.on_frame(md(2))
    assert seqs(session.take_market_data()) == [2]


def test_gap_is_recovered_by_resend_not_by_resubscribing(clock: FakeClock) -> None:
    # Defect 8: a gap was answered by re-subscribing, so the trades inside it were lost.
    session, transport = logged_on(clock)
    session.on_frame(md(2))
    session.on_frame(md(5))
    assert [m[35] for m in transport.sent][-1] == b"2"
    assert session.stats.resubscribes == 0
    session.on_frame(md(3, poss_dup=True))
    session.on_frame(md(4, poss_dup=True))
    assert seqs(session.take_market_data()) == [2, 3, 4, 5]


def test_gap_fill_from_the_venue_for_admin_messages_closes_the_gap(clock: FakeClock) -> None:
    session, _ = logged_on(clock)
    session.on_frame(md(5))
    session.on_frame(venue("4", 2, [(36, 4), (123, "Y")], poss_dup=True))  # 2, 3: heartbeats
    session.on_frame(md(4, poss_dup=True))
    assert seqs(session.take_market_data()) == [4, 5]
    assert session.expected_in_seq == 6


def test_long_gap_is_asked_for_in_chunks(clock: FakeClock) -> None:
    session, transport = logged_on(clock, resend_chunk_size=100)
    session.on_frame(md(252))  # 2..251 missing: 250 messages

    def requests() -> list[tuple[bytes, bytes]]:
        return [(m[7], m[16]) for m in transport.sent if m[35] == b"2"]

    assert requests() == [(b"2", b"101")]
    for seq in range(2, 102):
        session.on_frame(md(seq, poss_dup=True))
    assert requests() == [(b"2", b"101"), (b"102", b"201")]
    for seq in range(102, 252):
        session.on_frame(md(seq, poss_dup=True))
    assert requests() == [(b"2", b"101"), (b"102", b"201"), (b"202", b"0")]  # 16=0: the rest
    assert seqs(session.take_market_data()) == list(range(2, 253))
    assert not session.recovering


def test_gap_the_venue_does_not_fill_in_time_falls_back_to_a_snapshot(clock: FakeClock) -> None:
    session, transport = logged_on(clock, resend_timeout_s=5.0)
    session.on_frame(md(2))
    session.on_frame(md(5))
    session.on_frame(md(6))
    clock.now += 4
    session.on_frame(venue("0", 7))
    session.poll()
    assert session.recovering  # not yet
    clock.now += 1.5
    session.poll()
    assert not session.recovering
    assert seqs(session.take_market_data()) == [2, 5, 6]
    assert session.expected_in_seq == 8
    assert session.rejects.counts["seq_gap"] == 2  # 3 and 4, counted
    cancel, again = transport.sent[-2:]
    assert (cancel[35], cancel[263], again[35], again[263]) == (b"V", b"2", b"V", b"1")
    assert (session.stats.gaps_abandoned, session.stats.resubscribes) == (1, 1)


def test_venue_that_rejects_the_resend_request_gets_the_fallback(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(md(4))
    request_seq = int(transport.sent[-1][34])
    session.on_frame(venue("3", 2, [(45, request_seq), (58, "resend not supported")]))
    assert seqs(session.take_market_data()) == [4]
    assert session.expected_in_seq == 5
    assert session.stats.gaps_abandoned == 1
    assert session.rejects.counts["seq_gap"] == 1  # message 3 is lost, and counted


def test_reconnect_resumes_numbers_and_asks_for_what_was_missed(clock: FakeClock) -> None:
    session, transport = make(clock, next_out=40, next_in=100)
    session.start()
    logon = transport.sent[0]
    assert (logon[34], 141 in logon) == (b"40", False)
    session.on_frame(venue("A", 103, [(98, 0), (108, 10)]))  # 100..102 sent while away
    request, subscribe = transport.sent[1:3]
    assert (request[35], request[7], request[16]) == (b"2", b"100", b"0")
    assert subscribe[35] == b"V"
    for seq in (100, 101, 102):
        session.on_frame(md(seq, poss_dup=True))
    session.on_frame(md(104))
    assert seqs(session.take_market_data()) == [100, 101, 102, 104]


def test_reset_on_logon_starts_both_sides_at_one(clock: FakeClock) -> None:
    session, transport = make(clock, next_out=40, next_in=100, reset_on_logon=True)
    session.start()
    assert (transport.sent[0][34], transport.sent[0][141]) == (b"1", b"Y")
    session.on_frame(venue("A", 1, [(98, 0), (108, 10), (141, "Y")]))
    assert session.expected_in_seq == 2
    assert transport.sent[1][34] == b"2"


def test_venue_that_restarted_its_numbering_is_followed(clock: FakeClock) -> None:
    session, transport = make(clock, next_out=40, next_in=100)
    session.start()
    session.on_frame(venue("A", 1, [(98, 0), (108, 10)]))
    assert session.state is SessionState.ACTIVE
    assert session.expected_in_seq == 2
    assert session.rejects.counts["logon_seq_lower"] == 1
    session, transport = make(clock, next_out=40, next_in=100)
    session.start()
    session.on_frame(venue("A", 1, [(98, 0), (108, 10), (141, "Y")]))  # an explicit reset
    assert session.stats.venue_resets == 1
    assert (transport.sent[1][35], transport.sent[1][34], transport.sent[1][141]) == (
        b"A",
        b"1",
        b"Y",
    )


def test_outgoing_number_is_persisted_before_it_is_sent(clock: FakeClock) -> None:
    saved: list[tuple[int, int]] = []
    session, transport = make(clock)
    session._out._persist = lambda out, inn: saved.append((out, inn))
    session.start()
    assert saved == [(2, 1)]  # written before the Logon with 34=1 left
    session.on_frame(venue("A", 1, [(98, 0), (108, 10)]))
    assert saved[-1] == (3, 2)  # the MarketDataRequest
    outs = [o for o, _ in saved]
    assert outs == sorted(outs)
    assert int(transport.sent[-1][34]) < outs[-1]


def test_logout_after_market_data_keeps_what_was_applied(clock: FakeClock) -> None:
    # Defect 6 at the session level: the frames before a Logout stay available.
    session, _ = logged_on(clock)
    session.on_frame(md(2))
    session.on_frame(md(3))
    with pytest.raises(FixSessionError):
        session.on_frame(venue("5", 4))
    assert seqs(session.take_market_data()) == [2, 3]
    assert session.expected_in_seq == 5


def test_reject_of_the_resend_request_is_seen_even_above_the_gap(clock: FakeClock) -> None:
    # The venue's Reject comes after the messages that made the gap: QuickFIX handles a
    # Reject without checking for "too high", or the session would wait for the timeout.
    session, transport = logged_on(clock)
    session.on_frame(md(3))
    request_seq = int(transport.sent[-1][34])
    session.on_frame(venue("3", 4, [(45, request_seq), (372, "2"), (58, "no resend")]))
    assert not session.recovering
    assert seqs(session.take_market_data()) == [3]
    assert session.expected_in_seq == 5
    assert session.rejects.counts["seq_gap"] == 1


def test_too_many_held_messages_give_the_gap_up(clock: FakeClock) -> None:
    session, _ = logged_on(clock, max_held=3)
    for seq in (5, 6, 7):
        session.on_frame(md(seq))
    assert session.recovering
    session.on_frame(md(8))  # a fourth: memory is bounded, the gap is skipped and counted
    assert not session.recovering
    assert seqs(session.take_market_data()) == [5, 6, 7, 8]
    assert session.rejects.counts["seq_gap"] == 3


def test_venue_resend_request_above_the_gap_is_answered_and_held(clock: FakeClock) -> None:
    session, transport = logged_on(clock)
    session.on_frame(venue("2", 3, [(7, 1), (16, 0)]))
    request, fill = transport.sent[-2:]
    assert (request[35], request[7]) == (b"2", b"2")  # our own request for 2
    assert (fill[35], fill[123]) == (b"4", b"Y")  # and the venue's is answered at once
    session.on_frame(venue("0", 2, poss_dup=True))
    assert session.expected_in_seq == 4  # the held ResendRequest only moves the number on
