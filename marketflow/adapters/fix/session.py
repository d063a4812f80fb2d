"""FIX 4.4 initiator session for market data: logon, heartbeats, sequence numbers, logout.

Sans-IO: it writes to a transport (``write(bytes)``), is told about each received frame and
the passing of time (``poll()``), both clocks injected. Applied market-data frames wait, in
MsgSeqNum order, for ``take_market_data()``: a later message that ends the session loses none.
Sequencing follows QuickFIX ``Session.cpp`` (see recovery.py): gaps are held and resent, a
SequenceReset never lowers the expected number, too low without PossDup ends the session.
Numbers carry over between connections (passed in); Logon resets them only with
``reset_on_logon``. A venue that cannot resend (Reject, or ``resend_timeout_s`` without
progress) gets the fallback: the gap is skipped, counted (``seq_gap``), and re-subscribed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from marketflow.adapters.fix.codec import parse_fields
from marketflow.adapters.fix.recovery import GapRecovery, ResendRange
from marketflow.adapters.fix.session_messages import (
    BAD_FORMAT,
    POSS_DUP,
    REQUIRED_TAG_MISSING,
    VALUE_INCORRECT,
    peek_header,
    poss_dup_problem,
)
from marketflow.adapters.fix.session_out import Outbound, SeqSink
from marketflow.adapters.fix.session_types import (
    FixSessionError,
    LinkDead,
    SessionConfig,
    SessionState,
    SessionStats,
    Transport,
)
from marketflow.domain.ticks import RejectCounts

__all__ = ["FixSession", "FixSessionError", "LinkDead", "SessionConfig", "SessionState"]
__all__ += ["SessionStats", "Transport"]

log = logging.getLogger("marketflow.fix.session")

_MARKET_DATA = frozenset((b"W", b"X"))


class FixSession:
    """One logon-to-logout session over one connection; build a new one per connection,
    passing the sequence numbers the previous one ended with."""

    def __init__(
        self,
        config: SessionConfig,
        transport: Transport,
        *,
        monotonic: Callable[[], float],
        wall_ms: Callable[[], int],
        rejects: RejectCounts | None = None,
        next_out: int = 1,
        next_in: int = 1,
        persist: SeqSink | None = None,
    ) -> None:
        self.config = config
        self.state = SessionState.CREATED
        self.stats = SessionStats()
        self.rejects = rejects if rejects is not None else RejectCounts()
        self._monotonic = monotonic
        hb = float(config.heartbeat_s)
        self._test_after = config.test_request_after_s or hb * 1.2
        self._dead_after = config.dead_after_s or hb * 2
        self._in_seq = next_in  # next MsgSeqNum expected from the venue
        self._out = Outbound(
            config, transport, self.stats, monotonic=monotonic, wall_ms=wall_ms,
            next_out=next_out, next_in=lambda: self._in_seq, persist=persist,
        )  # fmt: skip
        self._last_received = self._started = monotonic()
        self._test_req_id: str | None = None
        self._req_no = 0
        self._sent_reset = False
        self._ready: list[bytes] = []
        self._recovery = GapRecovery(config.resend_chunk_size)

    @property
    def next_out_seq(self) -> int:
        return self._out.seq

    @property
    def expected_in_seq(self) -> int:
        """Every message below this number has been applied (or skipped and counted)."""
        return self._in_seq

    @property
    def md_req_id(self) -> str | None:
        return self._out.md_req_id

    @property
    def recovering(self) -> bool:
        return self._recovery.active

    @property
    def held(self) -> int:
        return len(self._recovery.queue)

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    def take_market_data(self) -> list[bytes]:
        """The market-data frames applied since the last call, in MsgSeqNum order."""
        ready, self._ready = self._ready, []
        return ready

    def persist(self) -> None:
        """Save both numbers now (the caller does so from time to time and at disconnect)."""
        self._out.persist()

    def start(self) -> None:
        """Send Logon; with ``reset_on_logon`` it carries 141=Y and both sides restart at 1."""
        self._started = self._last_received = self._monotonic()
        if self.config.reset_on_logon:
            self._out.seq = self._in_seq = 1
            self._sent_reset = True
        self._out.logon(self._sent_reset)
        self.state = SessionState.LOGON_SENT

    def logout(self, text: str = "") -> None:
        """Send Logout; ``closed`` turns true when the venue's Logout answers it."""
        if self.state in (SessionState.ACTIVE, SessionState.LOGON_SENT):
            self._out.send("5", [(58, text)] if text else [])
            self.state = SessionState.LOGOUT_SENT

    def on_frame(self, frame: bytes) -> None:
        """Account for one received message (and any held ones it releases).

        Raises FixSessionError when the session must end; what was applied before stays
        available to ``take_market_data()``."""
        self._last_received = self._monotonic()
        self._test_req_id = None  # anything at all proves the link is alive
        header = peek_header(frame)
        if header is None:
            self.rejects.add("bad_header", frame)
            return
        msg_type, seq = header
        try:
            if self.state is SessionState.LOGON_SENT:
                self._logon_answer(msg_type, seq, frame)
            elif self.state in (SessionState.ACTIVE, SessionState.LOGOUT_SENT):
                self._next(msg_type, seq, frame, queued=False)
            self._drain()
        except ValueError:  # FixParseError or a non-numeric value in a session message
            self.rejects.add("bad_session_message", frame)
            log.warning("fix_bad_session_message target=%s raw=%r", self.config.target, frame)

    def poll(self) -> float:
        """Run the timers; return the seconds until they next need running.

        Raises LinkDead when the venue has been silent too long.
        """
        now = self._monotonic()
        silent = now - self._last_received
        if self.state is SessionState.LOGON_SENT:
            if now - self._started >= self.config.logon_timeout_s:
                raise LinkDead(f"no Logon answer in {self.config.logon_timeout_s:g}s")
            return self._started + self.config.logon_timeout_s - now
        if self.state is not SessionState.ACTIVE:
            return self._dead_after
        if silent >= self._dead_after:
            raise LinkDead(f"nothing received for {silent:.1f}s")
        rec = self._recovery
        if rec.active and now - rec.last_progress >= self.config.resend_timeout_s:
            self._give_up("no resend in time")
        if silent >= self._test_after and self._test_req_id is None:
            self._req_no += 1
            self._test_req_id = f"TEST-{self._req_no}"
            self._out.send("1", [(112, self._test_req_id)])
            self.stats.test_requests_sent += 1
        hb = float(self.config.heartbeat_s)
        if now - self._out.last_sent >= hb:
            self._out.send("0", [])
        wake = min(self._out.last_sent + hb, self._last_received + self._dead_after)
        if self._test_req_id is None:
            wake = min(wake, self._last_received + self._test_after)
        if rec.active:
            wake = min(wake, rec.last_progress + self.config.resend_timeout_s)
        return max(wake - now, 0.001)

    # Inbound.

    def _logon_answer(self, msg_type: bytes, seq: int, frame: bytes) -> None:
        fields = dict(parse_fields(frame))
        if msg_type != b"A":
            text = fields.get(58, b"").decode(errors="replace")
            self.state = SessionState.CLOSED
            raise FixSessionError(f"logon refused ({msg_type.decode(errors='replace')}): {text}")
        self.state = SessionState.ACTIVE
        log.info(
            "fix_logon target=%s heartbeat_s=%s seq=%d expected=%d next_out=%d",
            self.config.target, fields.get(108), seq, self._in_seq, self._out.seq,
        )  # fmt: skip
        if fields.get(141) == b"Y":
            if not self._sent_reset:  # the venue restarts the numbering: so do we (QuickFIX)
                self.stats.venue_resets += 1
                log.warning("fix_venue_reset_seq target=%s", self.config.target)
                self._out.seq = 1
                self._recovery.clear()
                self._out.logon(reset=True)
            self._in_seq = seq + 1
        elif seq > self._in_seq:
            self._too_high(seq, frame)  # held: on release it only moves the number on
        elif seq < self._in_seq:
            # QuickFIX logs out here, and so would every reconnect: no data ever again. The
            # venue has restarted its numbering, so nothing below it can be recovered: follow.
            self.rejects.add("logon_seq_lower", b"expected %d got %d" % (self._in_seq, seq))
            log.warning("fix_logon_seq_lower target=%s expected=%d got=%d",
                        self.config.target, self._in_seq, seq)  # fmt: skip
            self._in_seq = seq + 1
        else:
            self._in_seq = seq + 1
        self._out.subscribe()

    def _next(self, msg_type: bytes, seq: int, frame: bytes, *, queued: bool) -> None:
        if msg_type == b"5":
            self._on_logout(seq, frame)
        elif msg_type == b"4":
            self._on_sequence_reset(seq, frame)
        elif queued and msg_type in (b"A", b"2", b"3"):
            self._advance(seq + 1)  # handled when it arrived (QuickFIX nextQueued)
        elif msg_type in (b"2", b"3"):  # handled even out of order, as QuickFIX does
            if seq == self._in_seq:
                self._advance(seq + 1)
            elif seq > self._in_seq:
                self._too_high(seq, frame)  # held: on release it only moves the number on
            if msg_type == b"2":
                self._on_resend_request(frame)
            else:
                self._admin(msg_type, seq, frame)
        elif self._in_order(seq, frame):
            self._advance(seq + 1)
            if msg_type in _MARKET_DATA:
                self._ready.append(frame)
            else:
                self._admin(msg_type, seq, frame)

    def _in_order(self, seq: int, frame: bytes, *, check_poss_dup: bool = True) -> bool:
        """True when ``frame`` is the expected message; else it is held, dropped or fatal."""
        expected = self._in_seq
        if seq > expected:
            self._too_high(seq, frame)
            return False
        poss_dup = POSS_DUP in frame
        if poss_dup and check_poss_dup and not self._poss_dup_valid(seq, frame):
            return False
        if seq < expected:
            if poss_dup:  # a resend of what we already have (QuickFIX ignores it)
                self.stats.duplicates += 1
                return False
            text = f"MsgSeqNum too low, expecting {expected} but received {seq}"
            self.logout(text)
            raise FixSessionError(text)
        if poss_dup:
            self.stats.resends_applied += 1
        return True

    def _poss_dup_valid(self, seq: int, frame: bytes) -> bool:
        problem = poss_dup_problem(frame)
        if problem is None:
            return True
        msg_type = (peek_header(frame) or (b"", 0))[0]
        self._out.reject(seq, msg_type, problem.reason, problem.text, problem.tag)
        self.rejects.add(problem.counted_as, frame)
        if problem.fatal:
            self.logout(problem.text)
            raise FixSessionError(f"resend refused: {problem.text}")
        return False

    def _too_high(self, seq: int, frame: bytes) -> None:
        rec = self._recovery
        rec.hold(seq, frame)
        if rec.active:
            rec.extend(seq)
        else:
            self.stats.gaps += 1
            log.warning("fix_seq_gap target=%s expected=%d got=%d: resend requested",
                        self.config.target, self._in_seq, seq)  # fmt: skip
            self._request_resend(rec.start(self._in_seq, seq, self._monotonic()))
        if len(rec.queue) > self.config.max_held:
            self._give_up(f"more than {self.config.max_held} messages held")

    def _advance(self, new_in: int) -> None:
        self._in_seq = new_in
        rec = self._recovery
        if rec.active:
            request = rec.progress(new_in, self._monotonic())
            if request is not None:
                self._request_resend(request)
            elif not rec.active:
                self.stats.gaps_recovered += 1
                log.info("fix_gap_recovered target=%s next=%d", self.config.target, new_in)

    def _drain(self) -> None:
        rec = self._recovery
        while (frame := rec.pop(self._in_seq)) is not None:
            header = peek_header(frame)
            assert header is not None  # checked when it was held
            self._next(header[0], header[1], frame, queued=True)
        rec.discard_below(self._in_seq)

    def _give_up(self, why: str) -> None:
        """The fallback: skip what the venue did not resend, count it, take a fresh snapshot."""
        rec = self._recovery
        before = self._in_seq
        skipped = 0
        rec.reset()
        while rec.queue:
            lowest = min(rec.queue)
            if lowest > self._in_seq:
                skipped += lowest - self._in_seq
                self._in_seq = lowest
            self._drain()
        self.stats.gaps_abandoned += 1
        self.stats.missed_messages += skipped
        if skipped:
            self.rejects.add("seq_gap", b"expected %d skipped %d" % (before, skipped), skipped)
        log.warning("fix_gap_abandoned target=%s why=%s expected=%d skipped=%d",
                    self.config.target, why, before, skipped)  # fmt: skip
        self._out.resubscribe()

    def _on_logout(self, seq: int, frame: bytes) -> None:
        if seq == self._in_seq:
            self._in_seq += 1
        if self.state is SessionState.LOGOUT_SENT:
            self.state = SessionState.CLOSED
            return
        self._out.send("5", [])
        self.state = SessionState.CLOSED
        text = dict(parse_fields(frame)).get(58, b"").decode(errors="replace")
        raise FixSessionError(f"venue logged out: {text}")

    def _on_sequence_reset(self, seq: int, frame: bytes) -> None:
        """QuickFIX ``nextSequenceReset``: a GapFill is sequenced like any message, a reset is
        not; either only ever moves the expected number up."""
        fields = dict(parse_fields(frame))
        gap_fill = fields.get(123) == b"Y"
        if gap_fill and not self._in_order(seq, frame, check_poss_dup=False):
            return
        raw = fields.get(36)
        if not raw or not raw.isdigit():
            reason, text = BAD_FORMAT if raw else REQUIRED_TAG_MISSING
            self._out.reject(seq, b"4", reason, text, 36)
            self.rejects.add("sequence_reset_without_new_seq_no", frame)
            return
        new_seq = int(raw)
        if new_seq > self._in_seq:
            if not gap_fill:
                log.info("fix_sequence_reset target=%s from=%d to=%d",
                         self.config.target, self._in_seq, new_seq)  # fmt: skip
            self._recovery.discard_below(new_seq)
            self._advance(new_seq)
        elif new_seq < self._in_seq:
            self._out.reject(seq, b"4", *VALUE_INCORRECT, 36)
            self.rejects.add("sequence_reset_lower", frame)
            log.warning("fix_sequence_reset_lower target=%s expected=%d new=%d: rejected",
                        self.config.target, self._in_seq, new_seq)  # fmt: skip

    def _on_resend_request(self, frame: bytes) -> None:
        # Nothing of ours is worth replaying: fill the whole range with one gap fill. Answered
        # even when out of order (QuickFIX verifies neither too high nor too low here).
        begin = dict(parse_fields(frame)).get(7, b"1")
        self._out.gap_fill(int(begin or b"1"))

    def _admin(self, msg_type: bytes, seq: int, frame: bytes) -> None:
        fields = dict(parse_fields(frame)) if msg_type != b"0" else {}
        if msg_type == b"1":
            self._out.send("0", [(112, fields.get(112, b""))])
        elif msg_type == b"3":
            self.stats.venue_rejects += 1
            self.rejects.add("venue_reject", frame)
            log.warning("fix_reject target=%s ref_seq=%s text=%s", self.config.target,
                        fields.get(45), fields.get(58))  # fmt: skip
            rec = self._recovery
            ours = fields.get(372) == b"2" or fields.get(45) == b"%d" % (rec.request_seq or 0)
            if rec.active and ours:
                self._give_up("venue rejected the ResendRequest")
        elif msg_type == b"Y":
            self.stats.md_request_rejects += 1
            self.rejects.add("md_request_reject", frame)
            log.error(
                "fix_md_request_reject target=%s req=%s reason=%s text=%s",
                self.config.target, fields.get(262), fields.get(281), fields.get(58),
            )  # fmt: skip

    def _request_resend(self, request: ResendRange) -> None:
        self._recovery.request_seq = self._out.resend_request(request.begin, request.end)
