"""FIX 4.4 acceptor session for downstream market-data subscribers (the FIX server).

Sans-IO, like the initiator (session.py) and sharing its parts: the framer, ``Outbound`` (our
numbering and what we send, GapFill answers to ResendRequests included), the gap bookkeeping
(recovery.py) and the header and PossDup helpers. Bytes go in with ``feed()``, time passes
with ``poll()``, and what to write comes out of ``take_output()``, which first makes the
sequence store safe for it: our number is reserved ``seq_reserve`` ahead (one fsync per that
many messages, not one per cadence flush of incrementals), the peer's is saved when it moved
(the consumer sends little: heartbeats, requests). A crash therefore never hands a number out
twice: the restart resumes above the last one sent and the consumer's ResendRequest gets a
GapFill. A session that ends (Logout, disconnect, daemon stop) saves both numbers exactly,
so a clean restart goes on with no gap at all.

Logon: only configured CompIDs (others get a Logout with the reason, then the link closes),
a HeartBtInt within bounds, ``admit`` (the server's cap, one session per CompID); why a Logon
was refused is kept as one of a fixed set of kinds (``refused``), for /health and metrics.
A refused duplicate never touches the store: the numbers belong to the live session.
Garbled input (bad checksum or length, garbage) is ignored once logged on, as the standard
says (the number is not consumed; a resend covers it), and ends the link before a Logon; both
are counted (``garbled``). A message whose MsgSeqNum cannot be read ends the session. The numbers
come from the CompID's sequence store (QuickFIX initiators keep theirs across restarts);
141=Y restarts both at 1, at logon or later in the session (a Logon with 141=Y numbered 1);
a Logon above the expected number makes us ask for a resend; below it without PossDup ends
the session. After logon: TestRequest answered with its 112, our own
TestRequest when the peer is silent past 1.2 x HeartBtInt, the link dropped at 2 x; a
ResendRequest is answered with one SequenceReset-GapFill over the range (market data is not
re-sent: it is stale) and ``on_gap_filled`` lets the server send fresh snapshots instead.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence

from marketflow.adapters.fix.codec import FixFramer, encode, parse_fields
from marketflow.adapters.fix.md_server_messages import (
    RequestProblem,
    incremental_body,
    parse_md_request,
    request_reject_body,
    snapshot_body,
)
from marketflow.adapters.fix.recovery import GapRecovery
from marketflow.adapters.fix.seq_store import SequenceStore
from marketflow.adapters.fix.session_messages import (
    POSS_DUP,
    Body,
    peek_header,
    reject_body,
)
from marketflow.adapters.fix.session_out import Outbound
from marketflow.adapters.fix.session_types import SessionConfig, SessionStats
from marketflow.adapters.fix.timestamps import format_utc
from marketflow.domain.md_levels import Level, LevelChange, MdRequest

log = logging.getLogger("marketflow.fix_server.session")

COMP_ID_PROBLEM = (9, "CompID problem")
# Why a Logon was refused (bounded: the /health and metrics label values).
REFUSED_COMP_ID = "comp_id"
REFUSED_HEARTBEAT = "heartbeat"
REFUSED_SEQ_TOO_LOW = "seq_too_low"
REFUSED_DUPLICATE = "duplicate"
REFUSED_SESSION_CAP = "session_cap"
REFUSED_NO_LOGON = "no_logon"
REFUSALS = (REFUSED_COMP_ID, REFUSED_HEARTBEAT, REFUSED_SEQ_TOO_LOW, REFUSED_DUPLICATE,
            REFUSED_SESSION_CAP, REFUSED_NO_LOGON)  # fmt: skip

Refusal = tuple[str, str]
"""``(kind, text)``: one of ``REFUSALS`` and the Logout's Text (58)."""
_SESSION_TYPES = frozenset((b"0", b"1", b"2", b"3", b"4", b"5", b"A"))


class State(enum.Enum):
    AWAITING_LOGON = "awaiting_logon"
    ACTIVE = "active"
    LOGOUT_SENT = "logout_sent"
    CLOSED = "closed"


class AcceptorPolicy:
    """Who may log on and the session's timings (from the ``[fix_server]`` settings)."""

    def __init__(
        self,
        comp_id: str,
        allowed: Sequence[str],
        *,
        heartbeat_min_s: int = 1,
        heartbeat_max_s: int = 300,
        logon_timeout_s: float = 10.0,
        logout_timeout_s: float = 2.0,
        resend_timeout_s: float = 10.0,
        seq_reserve: int = 1000,
    ) -> None:
        self.comp_id = comp_id
        self.allowed = frozenset(allowed)
        self.heartbeat_min_s = heartbeat_min_s
        self.heartbeat_max_s = heartbeat_max_s
        self.logon_timeout_s = logon_timeout_s
        self.logout_timeout_s = logout_timeout_s
        self.resend_timeout_s = resend_timeout_s
        self.seq_reserve = seq_reserve  # our numbers saved this far ahead while a session runs


def _no_request(req: MdRequest) -> None:
    del req


def _nothing() -> None:
    return None


class AcceptorSession:
    """One connection's session; a new one per connection (the numbers live in the store)."""

    def __init__(
        self,
        policy: AcceptorPolicy,
        store_for: Callable[[str], SequenceStore],
        admit: Callable[[str], Refusal | None],
        *,
        monotonic: Callable[[], float],
        wall_ms: Callable[[], int],
    ) -> None:
        self.policy = policy
        self.state = State.AWAITING_LOGON
        self.peer: str | None = None
        self.close_reason = ""
        self.refused: str | None = None  # the Logon refused: one of REFUSALS
        self.messages_sent = 0
        self.garbled = 0  # frames the framer could not read (ignored once logged on)
        self.stats = SessionStats()
        self.heartbeat_s = 30
        self.reset_on_logon = False
        self.on_request: Callable[[MdRequest], None] = _no_request
        self.on_logon: Callable[[], None] = _nothing
        self.on_gap_filled: Callable[[], None] = _nothing
        self._store_for = store_for
        self._admit = admit
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._framer = FixFramer()
        self._buf: list[bytes] = []
        self._store: SequenceStore | None = None
        self._out: Outbound | None = None
        self._reserved = 0  # the store holds a next_out at least this high (this session)
        self._saved_in = 0
        self._in_seq = 1
        self._started = self._last_received = monotonic()
        self._logout_at = 0.0
        self._test_req_id: str | None = None
        self._req_no = 0
        self._recovery = GapRecovery()

    # -- what the server calls ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def logged_on(self) -> bool:
        return self.state is State.ACTIVE

    @property
    def next_out_seq(self) -> int:
        return self._out.seq if self._out is not None else 1

    @property
    def expected_in_seq(self) -> int:
        return self._in_seq

    def write(self, data: bytes, /) -> None:
        """The transport of ``Outbound`` (one message a call): kept until ``take_output()``."""
        self.messages_sent += 1
        self._buf.append(data)

    def take_output(self) -> bytes:
        """What to write now; the store first covers every number in it (see the module)."""
        store, outbound = self._store, self._out
        if store is not None and outbound is not None and self._store_behind(outbound.seq):
            if outbound.seq > self._reserved:
                self._reserved = outbound.seq + self.policy.seq_reserve
            store.save(self._reserved, self._in_seq)
            self._saved_in = self._in_seq
        out = b"".join(self._buf)
        self._buf.clear()
        return out

    def _store_behind(self, next_out: int) -> bool:
        return next_out > self._reserved or self._in_seq != self._saved_in

    def feed(self, data: bytes) -> None:
        for frame in self._framer.feed(data):
            if self.closed:
                return
            if isinstance(frame, bytes):
                self.on_frame(frame)
            else:  # garbled: ignored, as the standard says (the peer's resend covers it)
                self.garbled += 1
                log.warning("fix_server_bad_frame peer=%s reason=%s", self.peer, frame.reason)
                if self.state is State.AWAITING_LOGON:  # the first message must be a Logon
                    self._refuse_silently(f"garbled frame before logon ({frame.reason})")

    def logout(self, text: str) -> None:
        """Send Logout; the session closes on the peer's answer or ``logout_timeout_s``."""
        if self.state is State.ACTIVE:
            self._send("5", [(58, text)] if text else [])
            self.state = State.LOGOUT_SENT
            self._logout_at = self._monotonic()
            self.close_reason = text

    def disconnected(self) -> None:
        """The link is gone: close, and save both numbers exactly (nothing more is sent)."""
        self._close(self.close_reason or "disconnected")
        self._buf.clear()
        if self._store is not None and self._out is not None:
            self._store.save(self._out.seq, self._in_seq)

    def poll(self) -> None:
        """Timers: logon timeout, heartbeats, TestRequest, dead peer, unanswered resend."""
        now = self._monotonic()
        if self.state is State.AWAITING_LOGON:
            if now - self._started >= self.policy.logon_timeout_s:
                self._refuse_silently("no logon")
            return
        if self.state is State.LOGOUT_SENT:
            if now - self._logout_at >= self.policy.logout_timeout_s:
                self._close(self.close_reason or "logout not answered")
            return
        if self.state is not State.ACTIVE or self._out is None:
            return
        hb = float(self.heartbeat_s)
        silent = now - self._last_received
        if silent >= 2 * hb + 1:
            log.warning("fix_server_peer_silent peer=%s silent_s=%.1f", self.peer, silent)
            self._close("peer silent")
            return
        if silent >= 1.2 * hb and self._test_req_id is None:
            self._req_no += 1
            self._test_req_id = f"TEST-{self._req_no}"
            self._send("1", [(112, self._test_req_id)])
            self.stats.test_requests_sent += 1
        rec = self._recovery
        if rec.active and now - rec.last_progress >= self.policy.resend_timeout_s:
            self._give_up()
        if now - self._out.last_sent >= hb:
            self._send("0", [])

    # -- MdSink: what the distribution sends ------------------------------------------------

    def snapshot(
        self, req_id: str, symbol: str, bids: Sequence[Level], offers: Sequence[Level]
    ) -> None:
        if self.state is State.ACTIVE:
            self._send("W", snapshot_body(req_id, symbol, bids, offers))

    def incremental(self, req_id: str, symbol: str, changes: Sequence[LevelChange]) -> None:
        if self.state is State.ACTIVE:
            self._send("X", incremental_body(req_id, symbol, changes))

    def request_reject(self, req_id: str, reason: int, text: str) -> None:
        if self.state is State.ACTIVE:
            self._send("Y", request_reject_body(req_id, reason, text))

    # -- inbound -----------------------------------------------------------------------------

    def on_frame(self, frame: bytes) -> None:
        self._last_received = self._monotonic()
        self._test_req_id = None
        header = peek_header(frame)
        try:
            pairs = parse_fields(frame)
        except ValueError:
            pairs = []
        if header is None or not pairs:
            log.warning("fix_server_bad_header peer=%s raw=%r", self.peer, frame[:200])
            self.garbled += 1
            if self.state is State.AWAITING_LOGON:
                self._refuse_silently("unreadable first message")
            else:  # a message without a readable MsgSeqNum cannot be sequenced: end it
                text = "MsgSeqNum (34) missing or unreadable"
                self.logout(text)
                self._close(text)
            return
        msg_type, seq = header
        fields = dict(pairs)
        if self.state is State.AWAITING_LOGON:
            self._logon(msg_type, seq, fields)
            return
        if (
            fields.get(49, b"").decode(errors="replace") != self.peer
            or fields.get(56, b"").decode(errors="replace") != self.policy.comp_id
        ):
            self._reject(seq, msg_type, *COMP_ID_PROBLEM, None)
            self.logout("CompID problem")
            return
        if msg_type == b"A" and fields.get(141) == b"Y" and self.state is State.ACTIVE:
            self._reset_in_session(seq)
            return
        self._next(msg_type, seq, frame, pairs, queued=False)
        self._drain()

    def _reset_in_session(self, seq: int) -> None:
        """A Logon with ResetSeqNumFlag=Y while logged on: FIX 4.4 lets either side restart
        the numbers this way (a 24-hour session's daily reset), the Logon numbered 1; QuickFIX
        answers it the same way.
        Both sides restart at 1, the answer is a Logon with 141=Y numbered 1, nothing held for
        a resend is kept, and subscriptions carry on under the new numbers. Any other
        number is a protocol error: Logout."""
        if seq != 1:
            text = f"MsgSeqNum must be 1 with ResetSeqNumFlag, received {seq}"
            self.logout(text)
            return
        assert self._out is not None
        self._recovery.clear()
        self._in_seq = 2
        self._out.seq = 1
        self._reserved = 0  # the store is saved at once with the new numbers (take_output)
        self.stats.venue_resets += 1
        self._send("A", [(98, 0), (108, self.heartbeat_s), (141, "Y")])
        log.warning("fix_server_seq_reset peer=%s", self.peer)

    def _logon(self, msg_type: bytes, seq: int, fields: dict[int, bytes]) -> None:
        if msg_type != b"A":  # the first message must be a Logon: drop the link, say nothing
            self._refuse_silently(f"first message was 35={msg_type.decode(errors='replace')}")
            return
        peer = fields.get(49, b"").decode(errors="replace")
        target = fields.get(56, b"").decode(errors="replace")
        if peer not in self.policy.allowed or target != self.policy.comp_id:
            why = (
                f"SenderCompID {peer!r} is not allowed"
                if peer not in self.policy.allowed
                else f"TargetCompID must be {self.policy.comp_id!r}"
            )
            self._refuse_unknown(peer, REFUSED_COMP_ID, why)
            return
        admitted = self._admit(peer)
        if admitted is not None and admitted[0] == REFUSED_DUPLICATE:
            self._refuse_unknown(peer, *admitted)  # its numbers belong to the live session
            return
        raw_hb = fields.get(108, b"")
        hb = int(raw_hb) if raw_hb.isdigit() else -1
        self.peer = peer
        self.reset_on_logon = fields.get(141) == b"Y"
        self._store = self._store_for(peer)
        nums = None if self.reset_on_logon else self._store.load()
        next_out, next_in = (nums.next_out, nums.next_in) if nums is not None else (1, 1)
        if self.reset_on_logon:
            next_out = next_in = 1
        self._in_seq = next_in
        self.heartbeat_s = max(hb, 1)
        config = SessionConfig(self.policy.comp_id, peer, (), heartbeat_s=self.heartbeat_s)
        self._out = Outbound(
            config, self, self.stats, monotonic=self._monotonic, wall_ms=self._wall_ms,
            next_out=next_out, next_in=lambda: self._in_seq, persist=None,
        )  # fmt: skip
        refusal: Refusal | None = admitted
        if not self.policy.heartbeat_min_s <= hb <= self.policy.heartbeat_max_s:
            lo, hi = self.policy.heartbeat_min_s, self.policy.heartbeat_max_s
            refusal = (REFUSED_HEARTBEAT, f"HeartBtInt must be {lo}..{hi}")
        elif seq < next_in and fields.get(43) != b"Y":
            text = f"MsgSeqNum too low, expecting {next_in} but received {seq}"
            refusal = (REFUSED_SEQ_TOO_LOW, text)
        if refusal is not None:  # numbered and saved: the peer counts our Logout
            if seq >= next_in:
                self._in_seq = seq + 1
            self._out.send("5", [(58, refusal[1])])
            log.warning("fix_server_logon_refused peer=%s reason=%s", peer, refusal[1])
            self.refused = refusal[0]
            self._close(refusal[1])
            return
        self.state = State.ACTIVE
        answer: Body = [(98, 0), (108, self.heartbeat_s)]
        if self.reset_on_logon:
            answer.append((141, "Y"))
        self._out.send("A", answer)
        if seq > next_in:  # the peer sent what we never got: ask for it (the Logon waits)
            self._recovery.hold(seq, b"")
            self.stats.gaps += 1
            self._request_resend(self._recovery.start(next_in, seq, self._monotonic()).begin)
        else:
            self._in_seq = seq + 1
        log.info("fix_server_logon peer=%s heartbeat_s=%d in=%d out=%d reset=%s", peer,
                 self.heartbeat_s, self._in_seq, self._out.seq, self.reset_on_logon)  # fmt: skip
        self.on_logon()

    def _refuse_unknown(self, peer: str, kind: str, why: str) -> None:
        """A CompID with no session here (or one already logged on elsewhere): a Logout
        numbered 1, nothing stored."""
        log.warning("fix_server_logon_refused peer=%s reason=%s", peer, why)
        self.write(encode("5", [(58, why)], sender=self.policy.comp_id, target=peer, seq=1,
                          sending_time=format_utc(self._wall_ms())))  # fmt: skip
        self.refused = kind
        self._close(why)

    def _refuse_silently(self, why: str) -> None:
        """No readable Logon: nobody to answer, the link is dropped."""
        log.warning("fix_server_logon_refused peer=%s reason=%s", self.peer, why)
        self.refused = REFUSED_NO_LOGON
        self._close(why)

    def _next(
        self,
        msg_type: bytes,
        seq: int,
        frame: bytes,
        pairs: list[tuple[int, bytes]],
        *,
        queued: bool,
    ) -> None:
        if queued and msg_type in (b"A", b"2", b"3"):
            self._advance(seq + 1)  # handled when it arrived
            return
        if msg_type == b"2":  # answered even out of order, as QuickFIX does
            if seq == self._in_seq:
                self._advance(seq + 1)
            elif seq > self._in_seq:
                self._too_high(seq, frame)
            self._on_resend_request(dict(pairs))
            return
        if msg_type == b"4" and dict(pairs).get(123) != b"Y":  # reset mode: not sequenced
            self._on_reset(seq, dict(pairs))
            return
        if seq > self._in_seq:
            self._too_high(seq, frame)
            return
        if seq < self._in_seq:
            if POSS_DUP in frame:
                self.stats.duplicates += 1
                return
            text = f"MsgSeqNum too low, expecting {self._in_seq} but received {seq}"
            self.logout(text)
            self._close(text)
            return
        self._advance(seq + 1)
        self._dispatch(msg_type, seq, pairs)

    def _dispatch(self, msg_type: bytes, seq: int, pairs: list[tuple[int, bytes]]) -> None:
        fields = dict(pairs)
        if msg_type == b"0":
            return
        if msg_type == b"1":
            self._send("0", [(112, fields.get(112, b""))])
        elif msg_type == b"4":
            self._on_reset(seq, fields)
        elif msg_type == b"5":
            if self.state is State.ACTIVE:
                self._send("5", [])
            self._close(fields.get(58, b"logout").decode(errors="replace") or "logout")
        elif msg_type == b"3":
            log.warning("fix_server_peer_reject peer=%s ref_seq=%s text=%s", self.peer,
                        fields.get(45), fields.get(58))  # fmt: skip
        elif msg_type == b"V":
            req = parse_md_request(pairs)
            if isinstance(req, RequestProblem):
                self._reject(seq, b"V", req.reason, req.text, req.tag)
                log.warning("fix_server_bad_request peer=%s tag=%d text=%s", self.peer,
                            req.tag, req.text)  # fmt: skip
            else:
                self.on_request(req)
        elif msg_type == b"A":
            self._reject(seq, b"A", 5, "already logged on", None)
        elif msg_type not in _SESSION_TYPES:
            self._send("j", [(45, seq), (372, msg_type), (380, 3),
                             (58, "unsupported message type")])  # fmt: skip

    def _on_reset(self, seq: int, fields: dict[int, bytes]) -> None:
        raw = fields.get(36, b"")
        if not raw.isdigit():
            self._reject(seq, b"4", 1, "Required tag missing", 36)
            return
        new_seq = int(raw)
        if new_seq > self._in_seq:
            self._recovery.discard_below(new_seq)
            self._advance(new_seq)
        elif new_seq < self._in_seq:
            self._reject(seq, b"4", 5, "Value is incorrect (out of range) for this tag", 36)

    def _on_resend_request(self, fields: dict[int, bytes]) -> None:
        raw = fields.get(7, b"1")
        begin = int(raw) if raw.isdigit() and int(raw) > 0 else 1
        if self._out is None or begin >= self._out.seq:
            return
        self._out.gap_fill(begin)
        self.stats.resend_requests += 1
        log.info("fix_server_gap_fill peer=%s from=%d to=%d", self.peer, begin, self._out.seq)
        self.on_gap_filled()

    def _too_high(self, seq: int, frame: bytes) -> None:
        rec = self._recovery
        rec.hold(seq, frame)
        if rec.active:
            rec.extend(seq)
            return
        self.stats.gaps += 1
        log.warning("fix_server_seq_gap peer=%s expected=%d got=%d", self.peer, self._in_seq, seq)
        self._request_resend(rec.start(self._in_seq, seq, self._monotonic()).begin)

    def _request_resend(self, begin: int) -> None:
        self._recovery.request_seq = self._send("2", [(7, begin), (16, 0)])

    def _advance(self, new_in: int) -> None:
        self._in_seq = new_in
        rec = self._recovery
        if rec.active:
            rec.progress(new_in, self._monotonic())
            if not rec.active:
                self.stats.gaps_recovered += 1

    def _drain(self) -> None:
        rec = self._recovery
        while not self.closed and (frame := rec.pop(self._in_seq)) is not None:
            if not frame:  # the Logon that was above the expected number
                self._advance(self._in_seq + 1)
                continue
            header = peek_header(frame)
            assert header is not None
            self._next(header[0], header[1], frame, parse_fields(frame), queued=True)
        rec.discard_below(self._in_seq)

    def _give_up(self) -> None:
        """The peer did not fill its gap in time: skip it (nothing it sends us is data)."""
        rec = self._recovery
        rec.reset()
        self.stats.gaps_abandoned += 1
        if rec.queue:
            self._in_seq = max(self._in_seq, min(rec.queue))
        self._drain()

    # -- outbound ----------------------------------------------------------------------------

    def _send(self, msg_type: str, body: Body) -> int:
        assert self._out is not None
        return self._out.send(msg_type, body)

    def _reject(
        self, ref_seq: int, ref_type: bytes, reason: int, text: str, tag: int | None
    ) -> None:
        if self._out is not None:
            self.stats.rejects_sent += 1
            self._send("3", reject_body(ref_seq, ref_type, reason, text, tag))

    def _close(self, why: str) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = self.close_reason or why
            log.info("fix_server_session_closed peer=%s reason=%s", self.peer, why)
