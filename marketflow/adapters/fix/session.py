"""FIX 4.4 initiator session for market data: logon, heartbeats, sequence numbers, logout.

Sans-IO: the session writes to a transport (anything with ``write(bytes)``, such as an
asyncio StreamWriter) and is told about each received frame and about the passing of time
(``poll()``), with both clocks injected. The connection loop lives in the feed adapter; parsing
market data lives in the parser. This keeps the state machine testable without sockets.

Gap recovery: on a gap in the venue's MsgSeqNum we re-subscribe (cancel the MarketDataRequest,
send a new one) instead of sending a ResendRequest. Market data is perishable: replayed
incrementals arrive after newer prices, many venues answer a resend with a gap fill anyway,
and with MarketDepth=1 a fresh snapshot restores the top of book at once. Trades inside the
gap are lost either way on such venues; they are counted (``seq_gap``) so it shows in /health.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from marketflow.adapters.fix.codec import SOH, FieldValue, encode, parse_fields
from marketflow.adapters.fix.timestamps import format_utc
from marketflow.domain.errors import MarketflowError
from marketflow.domain.ticks import RejectCounts

log = logging.getLogger("marketflow.fix.session")

_MARKET_DATA = frozenset((b"W", b"X"))
_RESUBSCRIBE_MIN_INTERVAL_S = 1.0  # a burst of gaps asks for one snapshot, not one per gap


class FixSessionError(MarketflowError):
    """The session cannot go on (logon refused, logout, sequence too low): reconnect."""


class LinkDead(FixSessionError):
    """Nothing received for 2 x HeartBtInt (or the configured limit), or no logon answer."""


class Transport(Protocol):
    def write(self, data: bytes, /) -> None: ...


class SessionState(enum.Enum):
    CREATED = "created"
    LOGON_SENT = "logon_sent"
    ACTIVE = "active"
    LOGOUT_SENT = "logout_sent"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Who we are, whom we talk to, what we subscribe to and the liveness timings."""

    sender: str
    target: str
    symbols: tuple[str, ...]
    heartbeat_s: int = 30
    begin: str = "FIX.4.4"
    test_request_after_s: float | None = None  # silence before a TestRequest; 1.2 x HeartBtInt
    dead_after_s: float | None = None  # silence before the link is dead; 2 x HeartBtInt
    logon_timeout_s: float = 10.0


@dataclass(slots=True)
class SessionStats:
    gaps: int = 0
    missed_messages: int = 0
    resubscribes: int = 0
    venue_rejects: int = 0
    md_request_rejects: int = 0
    test_requests_sent: int = 0


class FixSession:
    """One logon-to-logout session over one connection; build a new one per connection."""

    def __init__(
        self,
        config: SessionConfig,
        transport: Transport,
        *,
        monotonic: Callable[[], float],
        wall_ms: Callable[[], int],
        rejects: RejectCounts | None = None,
    ) -> None:
        self.config = config
        self.state = SessionState.CREATED
        self.stats = SessionStats()
        self.rejects = rejects if rejects is not None else RejectCounts()
        self._transport = transport
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        hb = float(config.heartbeat_s)
        self._test_after = config.test_request_after_s or hb * 1.2
        self._dead_after = config.dead_after_s or hb * 2
        self._out_seq = 1
        self._in_seq = 1  # next MsgSeqNum expected from the venue
        now = monotonic()
        self._last_sent = now
        self._last_received = now
        self._started = now
        self._test_req_id: str | None = None
        self._req_no = 0
        self._md_req_id: str | None = None
        self._last_resubscribe = -_RESUBSCRIBE_MIN_INTERVAL_S

    @property
    def next_out_seq(self) -> int:
        return self._out_seq

    @property
    def expected_in_seq(self) -> int:
        return self._in_seq

    @property
    def md_req_id(self) -> str | None:
        return self._md_req_id

    def start(self) -> None:
        """Send Logon with ResetSeqNumFlag: both sides start again at MsgSeqNum 1."""
        self._started = self._last_received = self._monotonic()
        hb = self.config.heartbeat_s
        self._send("A", [(98, 0), (108, hb), (141, "Y")])
        self.state = SessionState.LOGON_SENT

    def logout(self, text: str = "") -> None:
        """Send Logout; ``closed`` turns true when the venue's Logout answers it."""
        if self.state in (SessionState.ACTIVE, SessionState.LOGON_SENT):
            self._send("5", [(58, text)] if text else [])
            self.state = SessionState.LOGOUT_SENT

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    def on_frame(self, frame: bytes) -> bool:
        """Account for one received message; True when it is market data for the parser."""
        self._last_received = self._monotonic()
        self._test_req_id = None  # anything at all proves the link is alive
        i = frame.find(b"\x0135=")
        j = frame.find(SOH, i + 4)
        k = frame.find(b"\x0134=", j)
        m = frame.find(SOH, k + 4)
        seq_raw = frame[k + 4 : m]
        if i < 0 or k < 0 or not seq_raw.isdigit():
            self.rejects.add("bad_header", frame)
            return False
        msg_type = frame[i + 4 : j]
        seq = int(seq_raw)
        if msg_type in _MARKET_DATA and self.state is SessionState.ACTIVE:
            return self._sequence(seq, frame)
        try:
            self._admin(msg_type, seq, frame)
        except ValueError:  # FixParseError or a non-numeric value in a session message
            self.rejects.add("bad_session_message", frame)
            log.warning("fix_bad_session_message target=%s raw=%r", self.config.target, frame)
        return False

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
        if silent >= self._test_after and self._test_req_id is None:
            self._req_no += 1
            self._test_req_id = f"TEST-{self._req_no}"
            self._send("1", [(112, self._test_req_id)])
            self.stats.test_requests_sent += 1
        hb = float(self.config.heartbeat_s)
        if now - self._last_sent >= hb:
            self._send("0", [])
        wake = min(self._last_sent + hb, self._last_received + self._dead_after)
        if self._test_req_id is None:
            wake = min(wake, self._last_received + self._test_after)
        return max(wake - now, 0.001)

    def _sequence(self, seq: int, frame: bytes) -> bool:
        """Check the venue's MsgSeqNum; False when the message is a duplicate to drop."""
        expected = self._in_seq
        if seq == expected:
            self._in_seq = seq + 1
            return True
        if seq < expected:
            if b"\x0143=Y\x01" in frame:  # PossDupFlag: a resend we already have
                return False
            self.logout("MsgSeqNum too low")
            raise FixSessionError(f"MsgSeqNum {seq} lower than expected {expected}")
        missed = seq - expected
        self._in_seq = seq + 1
        self.stats.gaps += 1
        self.stats.missed_messages += missed
        self.rejects.add("seq_gap", b"expected %d got %d" % (expected, seq), missed)
        log.warning("fix_seq_gap target=%s expected=%d got=%d", self.config.target, expected, seq)
        self._resubscribe()
        return True

    def _admin(self, msg_type: bytes, seq: int, frame: bytes) -> None:
        fields = dict(parse_fields(frame))
        if self.state is SessionState.LOGON_SENT:
            if msg_type == b"A":
                self._in_seq = seq + 1
                self.state = SessionState.ACTIVE
                log.info("fix_logon target=%s heartbeat_s=%s", self.config.target, fields.get(108))
                self._subscribe()
                return
            text = fields.get(58, b"").decode(errors="replace")
            self.state = SessionState.CLOSED
            raise FixSessionError(f"logon refused ({msg_type.decode(errors='replace')}): {text}")
        if msg_type == b"4":  # SequenceReset: its own MsgSeqNum is not checked
            new_seq = int(fields.get(36, b"0") or b"0")
            gap_fill = fields.get(123) == b"Y"
            if new_seq > self._in_seq or not gap_fill:
                self._in_seq = new_seq
            return
        if msg_type == b"5":
            if self.state is not SessionState.LOGOUT_SENT:
                self._send("5", [])
                self.state = SessionState.CLOSED
                text = fields.get(58, b"").decode(errors="replace")
                raise FixSessionError(f"venue logged out: {text}")
            self.state = SessionState.CLOSED
            return
        if self.state is SessionState.ACTIVE and not self._sequence(seq, frame):
            return
        if msg_type == b"1":
            self._send("0", [(112, fields.get(112, b""))])
        elif msg_type == b"2":
            # Nothing of ours is worth replaying: fill the whole range with one gap fill.
            self._send_gap_fill(int(fields.get(7, b"1") or b"1"))
        elif msg_type == b"3":
            self.stats.venue_rejects += 1
            self.rejects.add("venue_reject", frame)
            log.warning(
                "fix_reject target=%s ref_seq=%s text=%s",
                self.config.target,
                fields.get(45),
                fields.get(58),
            )
        elif msg_type == b"Y":
            self.stats.md_request_rejects += 1
            self.rejects.add("md_request_reject", frame)
            log.error(
                "fix_md_request_reject target=%s req=%s reason=%s text=%s",
                self.config.target,
                fields.get(262),
                fields.get(281),
                fields.get(58),
            )

    def _subscribe(self) -> None:
        self._req_no += 1
        self._md_req_id = f"MD-{self._req_no}"
        self._send("V", self._md_request(self._md_req_id, 1))

    def _md_request(self, req_id: str, request_type: int) -> list[tuple[int, FieldValue]]:
        """MarketDataRequest body. The NoMDEntryTypes and NoRelatedSym groups are required in
        FIX 4.4 even to unsubscribe (263=2): QuickFIX rejects a V without 267 (35=3, required
        tag missing) and the old subscription then keeps streaming next to the new one."""
        fields: list[tuple[int, FieldValue]] = [
            (262, req_id),
            (263, request_type),
            (264, 1),
        ]
        if request_type == 1:
            fields.append((265, 1))
        fields += [(267, 3), (269, 0), (269, 1), (269, 2), (146, len(self.config.symbols))]
        fields.extend((55, symbol) for symbol in self.config.symbols)
        return fields

    def _resubscribe(self) -> None:
        now = self._monotonic()
        if now - self._last_resubscribe < _RESUBSCRIBE_MIN_INTERVAL_S:
            return
        self._last_resubscribe = now
        self.stats.resubscribes += 1
        if self._md_req_id is not None:  # 263=2: disable the old request before the new one
            self._send("V", self._md_request(self._md_req_id, 2))
        self._subscribe()

    def _send_gap_fill(self, begin_seq: int) -> None:
        # A resent message carries PossDupFlag and OrigSendingTime (122, "required for message
        # resent as a result of a ResendRequest"; the send time when the original's is unknown).
        now = format_utc(self._wall_ms())
        msg = encode(
            "4",
            [(43, "Y"), (122, now), (123, "Y"), (36, self._out_seq)],
            begin=self.config.begin,
            sender=self.config.sender,
            target=self.config.target,
            seq=begin_seq,
            sending_time=now,
        )
        self._write(msg)

    def _send(self, msg_type: str, fields: list[tuple[int, FieldValue]]) -> None:
        msg = encode(
            msg_type,
            fields,
            begin=self.config.begin,
            sender=self.config.sender,
            target=self.config.target,
            seq=self._out_seq,
            sending_time=format_utc(self._wall_ms()),
        )
        self._out_seq += 1
        self._write(msg)

    def _write(self, msg: bytes) -> None:
        self._last_sent = self._monotonic()
        self._transport.write(msg)
