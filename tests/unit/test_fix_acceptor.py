"""The FIX market-data server's acceptor session and its distribution of the world view,
driven sans-IO: bytes in, a fake clock, what the session has to write parsed back out.

The world view is the real one (app/world_view.py) fed book updates, so "what the subscriber
holds" is compared with what GET /bbo and GET /book would say; the sequence store is the real
file store in a temporary directory, so a "restart" is a new session on the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from marketflow.adapters.fix.acceptor import (
    REFUSED_COMP_ID,
    REFUSED_DUPLICATE,
    REFUSED_HEARTBEAT,
    REFUSED_NO_LOGON,
    REFUSED_SEQ_TOO_LOW,
    REFUSED_SESSION_CAP,
    AcceptorPolicy,
    AcceptorSession,
    Refusal,
)
from marketflow.adapters.fix.codec import FieldValue, FixFramer, encode, parse_fields
from marketflow.adapters.fix.seq_store import SequenceStore
from marketflow.app.fix_distribution import Distribution
from marketflow.app.world_view import WorldView
from marketflow.domain.ticks import BookUpdate
from marketflow.settings import WorldViewSettings

ME, PEER = "MARKETFLOW", "CONSUMER"
SYMBOLS = ("BTCUSDT", "ETHUSDT")
SENT = "20260102-12:00:00.000"
Msg = dict[int, bytes]
Body = list[tuple[int, FieldValue]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def never(peer: str) -> Refusal | None:
    del peer
    return None


class Rig:
    """One connection: a session on the shared store directory, the distribution, the view."""

    def __init__(
        self,
        tmp_path: Path,
        clock: Clock,
        view: WorldView,
        admit: Callable[[str], Refusal | None] = never,
        max_depth: int = 5,
    ) -> None:
        policy = AcceptorPolicy(ME, [PEER, "OTHER"], heartbeat_min_s=1, heartbeat_max_s=60,
                                logon_timeout_s=5.0, logout_timeout_s=2.0,
                                seq_reserve=100)  # fmt: skip
        self.stores: list[SequenceStore] = []

        def store_for(peer: str) -> SequenceStore:
            store = SequenceStore(tmp_path / f"{peer}.seq", ME, peer)
            self.stores.append(store)
            return store

        self.session = s = AcceptorSession(
            policy, store_for, admit, monotonic=clock, wall_ms=lambda: 1_767_355_200_000
        )
        self.dist = Distribution(view, SYMBOLS, max_depth)
        view.subscribe(self.dist.mark)
        s.on_request = lambda req: self.dist.request(s, req)
        s.on_logon = lambda: self.dist.attach(s)
        s.on_gap_filled = lambda: self.dist.refresh(s)
        self.seq = 1
        self._framer = FixFramer()

    def raw(self, data: bytes) -> list[Msg]:
        self.session.feed(data)
        return self.out()

    def out(self) -> list[Msg]:
        msgs: list[Msg] = []
        self.frames: list[bytes] = []  # the raw frames (a dict keeps one value a tag)
        for frame in self._framer.feed(self.session.take_output()):
            assert isinstance(frame, bytes), frame  # everything we send frames cleanly
            self.frames.append(frame)
            msgs.append(dict(parse_fields(frame)))
        return msgs

    def send(
        self,
        msg_type: str,
        body: Body | None = None,
        *,
        seq: int | None = None,
        sender: str = PEER,
        target: str = ME,
    ) -> list[Msg]:
        n = self.seq if seq is None else seq
        self.seq = n + 1
        frame = encode(msg_type, body or [], sender=sender, target=target, seq=n,
                       sending_time=SENT)  # fmt: skip
        return self.raw(frame)

    def logon(self, hb: int = 10, **kw: object) -> list[Msg]:
        body: Body = [(98, 0), (108, hb)]
        if kw.pop("reset", False):
            body.append((141, "Y"))
        return self.send("A", body, **kw)  # type: ignore[arg-type]

    def subscribe(
        self, req_id: str = "R1", symbols: tuple[str, ...] = SYMBOLS, depth: int = 1, kind: int = 1
    ) -> list[Msg]:
        body: Body = [(262, req_id), (263, kind), (264, depth)]
        if kind == 1:
            body.append((265, 1))
        body += [(267, 2), (269, 0), (269, 1), (146, len(symbols))]
        body += [(55, s) for s in symbols]
        return self.send("V", body)


def types(msgs: list[Msg]) -> list[bytes]:
    return [m[35] for m in msgs]


def seqs(msgs: list[Msg]) -> list[int]:
    return [int(m[34]) for m in msgs]


def entries(frame: bytes) -> list[dict[int, bytes]]:
    """The repeating group of a 35=W / 35=X, one dict per entry (split on its first tag)."""
    out: list[dict[int, bytes]] = []
    first = None
    for tag, value in parse_fields(frame):
        if tag in (279, 269) and first in (None, tag):
            first = tag
            out.append({})
        if out:
            out[-1][tag] = value
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def view() -> WorldView:
    return WorldView(WorldViewSettings(), lambda: 1_767_355_200_000)


def quote(view: WorldView, venue: str, symbol: str, bid: float, ask: float, size: float = 1.0,
          depth: tuple[tuple[float, float], ...] = ()) -> None:  # fmt: skip
    bids = ((bid, size), *((bid - d, s) for d, s in depth)) if depth else ()
    asks = ((ask, size), *((ask + d, s) for d, s in depth)) if depth else ()
    view.on_books([BookUpdate(venue, symbol, bid, ask, 1_767_355_200_000, size, size,
                              bids, asks)])  # fmt: skip


@pytest.fixture
def rig(tmp_path: Path, clock: Clock, view: WorldView) -> Rig:
    return Rig(tmp_path, clock, view)


# -- logon --------------------------------------------------------------------------------


def test_logon_answered_with_the_peers_heartbeat(rig: Rig) -> None:
    out = rig.logon(hb=7)
    assert types(out) == [b"A"]
    assert out[0][108] == b"7"
    assert out[0][49] == ME.encode()
    assert out[0][56] == PEER.encode()
    assert rig.session.logged_on
    assert rig.session.refused is None


@pytest.mark.parametrize(
    ("sender", "target", "text"),
    [("STRANGER", ME, b"SenderCompID 'STRANGER' is not allowed"),
     (PEER, "SOMEONE", b"TargetCompID must be 'MARKETFLOW'")],
)  # fmt: skip
def test_only_configured_comp_ids_log_on(
    rig: Rig, tmp_path: Path, sender: str, target: str, text: bytes
) -> None:
    out = rig.logon(sender=sender, target=target)
    assert types(out) == [b"5"]
    assert out[0][58] == text
    assert rig.session.closed
    assert rig.session.refused == REFUSED_COMP_ID
    assert not list(tmp_path.iterdir())  # nothing stored for a stranger


@pytest.mark.parametrize("hb", [0, 61])
def test_heartbeat_outside_bounds_refused(rig: Rig, hb: int) -> None:
    out = rig.logon(hb=hb)
    assert types(out) == [b"5"]
    assert out[0][58] == b"HeartBtInt must be 1..60"
    assert rig.session.closed
    assert rig.session.refused == REFUSED_HEARTBEAT


def test_session_cap_refused_with_reason(tmp_path: Path, clock: Clock, view: WorldView) -> None:
    full = Rig(tmp_path, clock, view, admit=lambda p: (REFUSED_SESSION_CAP, "too many sessions"))
    out = full.logon()
    assert types(out) == [b"5"]
    assert out[0][58] == b"too many sessions"
    assert full.session.refused == REFUSED_SESSION_CAP


def test_duplicate_logon_leaves_the_live_sessions_numbers_alone(
    tmp_path: Path, clock: Clock, view: WorldView
) -> None:
    live = Rig(tmp_path, clock, view)
    live.logon()
    live.send("0")
    saved = (tmp_path / f"{PEER}.seq").read_bytes()
    dup = Rig(tmp_path, clock, view, admit=lambda p: (REFUSED_DUPLICATE, "already logged on"))
    out = dup.logon(seq=99)
    assert types(out) == [b"5"]
    assert dup.session.refused == REFUSED_DUPLICATE
    dup.session.disconnected()
    assert (tmp_path / f"{PEER}.seq").read_bytes() == saved


def test_first_message_not_a_logon_drops_the_link(rig: Rig) -> None:
    assert rig.send("0") == []
    assert rig.session.closed
    assert rig.session.refused == REFUSED_NO_LOGON


def test_no_logon_within_the_timeout_drops_the_link(rig: Rig, clock: Clock) -> None:
    clock.now += 4.9
    rig.session.poll()
    assert not rig.session.closed
    clock.now += 0.2
    rig.session.poll()
    assert rig.session.closed
    assert rig.session.refused == REFUSED_NO_LOGON


def test_garbage_before_logon_drops_the_link(rig: Rig) -> None:
    assert rig.raw(b"8=FIX.4.4\x019=5\x0135=A\x0110=000\x01") == []
    assert rig.session.closed
    assert rig.session.garbled == 1


# -- session-level messages ---------------------------------------------------------------


def test_heartbeats_when_quiet_then_test_request_then_link_dead(rig: Rig, clock: Clock) -> None:
    rig.logon(hb=10)
    clock.now += 10
    rig.session.poll()
    assert types(rig.out()) == [b"0"]
    clock.now += 2  # 12 s of silence from the peer: 1.2 x HeartBtInt
    rig.session.poll()
    out = rig.out()
    assert types(out) == [b"1"]
    assert out[0][112].startswith(b"TEST-")
    clock.now += 9  # 21 s: 2 x HeartBtInt + 1
    rig.session.poll()
    assert rig.session.closed
    assert rig.session.close_reason == "peer silent"


def test_test_request_answered_with_its_id(rig: Rig) -> None:
    rig.logon()
    out = rig.send("1", [(112, "PING-42")])
    assert types(out) == [b"0"]
    assert out[0][112] == b"PING-42"


def test_resend_request_answered_with_one_gap_fill_no_replay(rig: Rig, view: WorldView) -> None:
    quote(view, "v1", "BTCUSDT", 100.0, 101.0)
    rig.logon()  # our 1
    rig.subscribe()  # our 2, 3: a snapshot per symbol
    quote(view, "v1", "BTCUSDT", 100.5, 101.0)
    rig.dist.flush()  # our 4: an incremental
    assert seqs(rig.out()) == [4]
    out = rig.send("2", [(7, 2), (16, 0)])
    fill, *fresh = out
    assert fill[35] == b"4"
    assert fill[123] == b"Y"
    assert fill[43] == b"Y"
    assert 122 in fill
    assert int(fill[34]) == 2
    assert int(fill[36]) == 5
    # then fresh snapshots (what the skipped incrementals said is stale), numbered on
    assert types(fresh) == [b"W", b"W"]
    assert seqs(fresh) == [5, 6]
    assert rig.session.logged_on


def test_peer_gap_asks_for_a_resend_and_waits(rig: Rig) -> None:
    rig.logon()
    out = rig.send("0", seq=5)  # we expected 2
    assert types(out) == [b"2"]
    assert out[0][7] == b"2"
    assert out[0][16] == b"0"
    rig.send("4", [(43, "Y"), (123, "Y"), (36, 5)], seq=2)  # the peer's GapFill
    assert rig.session.expected_in_seq == 6  # the held message applied after it
    assert rig.session.logged_on


def test_sequence_too_low_ends_the_session_with_a_logout(rig: Rig) -> None:
    rig.logon()
    rig.send("0")
    out = rig.send("0", seq=2)
    assert types(out) == [b"5"]
    assert out[0][58] == b"MsgSeqNum too low, expecting 3 but received 2"
    assert rig.session.closed


def test_possdup_below_the_expected_number_is_ignored(rig: Rig) -> None:
    rig.logon()
    rig.send("0")
    frame = encode("0", [(43, "Y"), (122, SENT)], sender=PEER, target=ME, seq=2, sending_time=SENT)
    assert rig.raw(frame) == []
    assert rig.session.logged_on
    assert rig.session.stats.duplicates == 1


def test_bad_checksum_ignored_without_consuming_a_number(rig: Rig) -> None:
    rig.logon()
    good = encode("1", [(112, "X")], sender=PEER, target=ME, seq=2, sending_time=SENT)
    bad = good[:-4] + b"%03d\x01" % ((int(good[-4:-1]) + 1) % 256)
    assert rig.raw(bad) == []  # ignored, as FIX says, and counted
    assert rig.session.garbled == 1
    assert rig.session.expected_in_seq == 2
    assert types(rig.raw(good)) == [b"0"]  # the same number, intact, is taken


def test_wrong_comp_id_after_logon_rejected_and_logged_out(rig: Rig) -> None:
    rig.logon()
    out = rig.send("0", sender="OTHER")
    assert types(out) == [b"3", b"5"]
    assert out[0][373] == b"9"
    assert out[1][58] == b"CompID problem"


def test_unsupported_message_type_gets_a_business_reject(rig: Rig) -> None:
    rig.logon()
    out = rig.send("D", [(11, "ORDER-1")])
    assert types(out) == [b"j"]
    assert out[0][372] == b"D"
    assert out[0][45] == b"2"


def test_logout_handshake_from_the_peer(rig: Rig) -> None:
    rig.logon()
    out = rig.send("5", [(58, "bye")])
    assert types(out) == [b"5"]
    assert rig.session.closed


def test_our_logout_waits_for_the_answer_then_closes(
    rig: Rig, clock: Clock, view: WorldView, tmp_path: Path
) -> None:
    rig.logon()
    rig.session.logout("daemon stopping")
    out = rig.out()
    assert types(out) == [b"5"]
    assert out[0][58] == b"daemon stopping"
    assert not rig.session.closed
    assert rig.send("5") == []  # the answer: nothing more to say
    assert rig.session.closed
    other = Rig(tmp_path, clock, view)
    other.logon()
    other.session.logout("daemon stopping")
    clock.now += 2.0
    other.session.poll()
    assert other.session.closed  # never answered: closed after logout_timeout_s


# -- sequence numbers across a restart ----------------------------------------------------


def test_numbers_survive_a_restart(tmp_path: Path, clock: Clock, view: WorldView) -> None:
    first = Rig(tmp_path, clock, view)
    first.logon()
    first.subscribe()  # our 1 (Logon), 2, 3 (snapshots); theirs 1, 2
    first.send("0")
    first.session.disconnected()
    again = Rig(tmp_path, clock, view)
    out = again.logon(seq=4)
    assert types(out) == [b"A"]
    assert seqs(out) == [4]
    assert again.session.expected_in_seq == 5


def test_a_crash_resumes_above_every_number_sent(
    tmp_path: Path, clock: Clock, view: WorldView
) -> None:
    """No clean end (the process died): our number comes from the reservation, the peer's
    was saved as it moved; many messages cost one save of ours, not one per flush."""
    first = Rig(tmp_path, clock, view)
    first.logon()  # our 1
    first.subscribe(symbols=("BTCUSDT",))  # our 2
    saved = (tmp_path / f"{PEER}.seq").read_bytes()
    for i in range(30):  # 30 incrementals, our 3..32, one flush each
        quote(view, "v1", "BTCUSDT", 100.0 + i, 200.0)
        first.dist.flush()
        first.out()
    assert (tmp_path / f"{PEER}.seq").read_bytes() == saved  # not saved per flush
    assert first.session.next_out_seq == 33
    again = Rig(tmp_path, clock, view)  # first never saw disconnected()
    out = again.logon(seq=3)
    assert types(out) == [b"A"]
    assert seqs(out) == [2 + 100]  # reserved 100 ahead at our 1: above the 32 sent
    assert again.session.expected_in_seq == 4  # the peer's number was exact


def test_reconnect_below_the_kept_number_refused(
    tmp_path: Path, clock: Clock, view: WorldView
) -> None:
    first = Rig(tmp_path, clock, view)
    first.logon()
    first.send("0")
    first.session.disconnected()
    again = Rig(tmp_path, clock, view)
    out = again.logon(seq=1)  # a peer that forgot its numbers and asks no reset
    assert types(out) == [b"5"]
    assert out[0][58] == b"MsgSeqNum too low, expecting 3 but received 1"
    assert again.session.refused == REFUSED_SEQ_TOO_LOW


def test_reset_seq_num_flag_restarts_both_at_one(
    tmp_path: Path, clock: Clock, view: WorldView
) -> None:
    first = Rig(tmp_path, clock, view)
    first.logon()
    first.send("0")
    first.session.disconnected()
    again = Rig(tmp_path, clock, view)
    out = again.logon(seq=1, reset=True)
    assert types(out) == [b"A"]
    assert seqs(out) == [1]
    assert out[0][141] == b"Y"
    assert again.session.expected_in_seq == 2


def test_reset_seq_num_flag_in_session_restarts_both_at_one_and_keeps_the_feed(
    tmp_path: Path, rig: Rig, view: WorldView
) -> None:
    rig.logon()
    rig.subscribe(symbols=("BTCUSDT",))
    for _ in range(3):
        rig.send("0")
    assert rig.session.next_out_seq > 2
    assert rig.session.expected_in_seq == 6
    out = rig.logon(seq=1, reset=True)  # a daily reset without a new connection
    assert types(out) == [b"A"]
    assert seqs(out) == [1]
    assert out[0][141] == b"Y"
    assert rig.session.logged_on
    assert rig.session.expected_in_seq == 2
    quote(view, "v1", "BTCUSDT", 100.0, 101.0)
    rig.dist.flush()
    assert types(rig.out()) == [b"X"]  # the subscription carries on, numbered 2
    assert rig.session.next_out_seq == 3
    rig.session.take_output()
    saved = SequenceStore(tmp_path / f"{PEER}.seq", ME, PEER).load()
    assert saved is not None
    assert saved.next_in == 2
    assert saved.next_out <= 3 + 100
    assert types(rig.send("0", seq=2)) == []  # 2 is what comes next now: no reject


def test_reset_seq_num_flag_in_session_not_numbered_one_logs_out(rig: Rig) -> None:
    rig.logon()
    rig.send("0")
    out = rig.logon(seq=5, reset=True)
    assert types(out) == [b"5"]
    assert out[0][58] == b"MsgSeqNum must be 1 with ResetSeqNumFlag, received 5"


def test_logon_above_the_kept_number_asks_for_the_gap(
    tmp_path: Path, clock: Clock, view: WorldView
) -> None:
    first = Rig(tmp_path, clock, view)
    first.logon()
    first.session.disconnected()
    again = Rig(tmp_path, clock, view)
    out = again.logon(seq=6)  # we expected 2
    assert types(out) == [b"A", b"2"]
    assert out[1][7] == b"2"


# -- market data --------------------------------------------------------------------------


def test_subscribe_snapshot_then_incrementals_match_the_view(rig: Rig, view: WorldView) -> None:
    quote(view, "v1", "BTCUSDT", 100.0, 101.0, 2.0)
    quote(view, "v2", "BTCUSDT", 100.5, 101.5, 3.0)
    rig.logon()
    out = rig.subscribe()
    assert types(out) == [b"W", b"W"]
    btc, eth = out
    assert btc[55] == b"BTCUSDT"
    assert btc[262] == b"R1"
    assert eth[268] == b"0"
    bbo = view.bbo("BTCUSDT")
    assert bbo is not None
    bid, ask = bbo["bid"], bbo["ask"]
    assert isinstance(bid, dict)
    assert isinstance(ask, dict)
    got = entries(rig.frames[0])
    assert [(e[269], float(e[270]), float(e[271]), e[282], e[290]) for e in got] == [
        (b"0", bid["price"], bid["size"], str(bid["exchange"]).encode(), b"1"),
        (b"1", ask["price"], ask["size"], str(ask["exchange"]).encode(), b"1"),
    ]
    quote(view, "v1", "BTCUSDT", 100.7, 101.0, 2.0)  # new best bid at v1
    quote(view, "v1", "BTCUSDT", 100.8, 101.0, 2.0)  # coalesced: one incremental at the flush
    rig.dist.flush()
    out = rig.out()
    assert types(out) == [b"X"]
    assert out[0][279] == b"1"
    assert out[0][269] == b"0"
    assert out[0][55] == b"BTCUSDT"
    assert float(out[0][270]) == 100.8
    assert out[0][282] == b"v1"
    assert out[0][262] == b"R1"
    rig.dist.flush()
    assert rig.out() == []  # nothing changed, nothing sent


def test_market_depth_n_sends_the_merged_book(rig: Rig, view: WorldView) -> None:
    quote(view, "v1", "BTCUSDT", 100.0, 101.0, 1.0, depth=((1.0, 1.0), (2.0, 1.0)))
    quote(view, "v2", "BTCUSDT", 99.5, 101.5, 1.0, depth=((1.0, 1.0),))
    rig.logon()
    out = rig.subscribe(symbols=("BTCUSDT",), depth=3)
    book = view.book("BTCUSDT", 3)
    assert book is not None
    assert types(out) == [b"W"]
    assert out[0][268] == b"6"
    got = entries(rig.frames[0])
    sides: list[tuple[bytes, list[dict[str, Any]]]] = [(b"0", book["bids"]), (b"1", book["asks"])]  # type: ignore[list-item]
    assert [(e[269], float(e[270]), e[282], int(e[290])) for e in got] == [
        (side, lv["price"], lv["exchange"].encode(), pos)
        for side, levels in sides
        for pos, lv in enumerate(levels, 1)
    ]
    # v1's second levels move inside v2's: levels 2 and 3 of each side change (by position)
    quote(view, "v1", "BTCUSDT", 100.0, 101.0, 1.0, depth=((0.25, 1.0), (2.0, 1.0)))
    rig.dist.flush()
    out = rig.out()
    assert types(out) == [b"X"]
    changes = entries(rig.frames[0])
    assert [(c[279], c[269], int(c[290]), float(c[270])) for c in changes] == [
        (b"1", b"0", 2, 99.75), (b"1", b"0", 3, 99.5),
        (b"1", b"1", 2, 101.25), (b"1", b"1", 3, 101.5),
    ]  # fmt: skip


def test_unknown_symbol_rejected_with_35y(rig: Rig) -> None:
    rig.logon()
    out = rig.subscribe(symbols=("NOPEUSDT",))
    assert types(out) == [b"Y"]
    assert out[0][281] == b"0"
    assert b"NOPEUSDT" in out[0][58]
    assert out[0][262] == b"R1"
    assert rig.session.logged_on


def test_depth_above_the_cap_and_full_refresh_rejected(rig: Rig) -> None:
    rig.logon()
    assert rig.subscribe(depth=6)[0][281] == b"5"
    body: Body = [(262, "F"), (263, 1), (264, 1), (265, 0), (267, 1), (269, 0), (146, 1),
                  (55, "BTCUSDT")]  # fmt: skip
    assert rig.send("V", body)[0][281] == b"6"


def test_duplicate_req_id_rejected(rig: Rig) -> None:
    rig.logon()
    rig.subscribe()
    out = rig.subscribe()
    assert types(out) == [b"Y"]
    assert out[0][281] == b"1"


def test_unsubscribe_stops_the_updates(rig: Rig, view: WorldView) -> None:
    rig.logon()
    rig.subscribe()
    quote(view, "v1", "BTCUSDT", 100.0, 101.0)
    rig.dist.flush()
    assert types(rig.out()) == [b"X"]
    assert rig.subscribe(kind=2) == []
    quote(view, "v1", "BTCUSDT", 100.5, 101.0)
    rig.dist.flush()
    assert rig.out() == []


def test_malformed_request_gets_a_session_reject(rig: Rig) -> None:
    rig.logon()
    out = rig.send("V", [(262, "R"), (263, 1), (264, 1), (267, 2), (269, 0), (146, 1),
                         (55, "BTCUSDT")])  # fmt: skip
    assert types(out) == [b"3"]
    assert out[0][371] == b"267"


def test_a_venue_leaving_the_view_sends_deletes(rig: Rig, view: WorldView) -> None:
    quote(view, "v1", "BTCUSDT", 100.0, 101.0)
    rig.logon()
    rig.subscribe(symbols=("BTCUSDT",))
    view.set_state("v1", "down")  # its link dropped: nothing left in the view
    rig.dist.flush()
    out = rig.out()
    assert types(out) == [b"X"]
    gone = entries(rig.frames[0])
    assert [(e[279], e[269], float(e[270]), e[282], e[290]) for e in gone] == [
        (b"2", b"0", 100.0, b"v1", b"1"),
        (b"2", b"1", 101.0, b"v1", b"1"),
    ]
    bbo = view.bbo("BTCUSDT")
    assert bbo is not None
    assert (bbo["bid"], bbo["ask"]) == (None, None)
