"""The FIX venue simulator's sessions: numbering that survives reconnects, and resends.

A session belongs to the initiator's CompID, not to a connection: like a real acceptor's store
it keeps both MsgSeqNums and a bounded history of what it sent, so a reconnect resumes the
sequence (unless the initiator's Logon carries 141=Y) and a ResendRequest is answered with the
original market-data messages (43=Y, 122 = their first SendingTime) and gap fills for admin
messages and anything older than the history. An injected gap is a message that was numbered
and kept in the history but not written: the resend recovers it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from marketflow.adapters.fix.codec import FieldValue, encode
from marketflow.adapters.fix.timestamps import format_utc

_APP = frozenset(("W", "X", "Y"))


@dataclass(slots=True)
class Trade:
    """One trade of the market; ``logged`` once it has reached at least one client."""

    symbol: str
    price: str
    timestamp_ms: int
    logged: bool = False


@dataclass(slots=True)
class Sent:
    seq: int
    msg_type: str
    fields: Sequence[tuple[int, FieldValue]]
    sent_ms: int
    trade: Trade | None


@dataclass(slots=True)
class VenueSession:
    """The numbers and history of one initiator (by its SenderCompID)."""

    history_size: int
    out_seq: int = 1
    in_seq: int = 1
    history: deque[Sent] = field(default_factory=deque)

    def reset(self) -> None:
        self.out_seq = self.in_seq = 1
        self.history.clear()

    def remember(self, sent: Sent) -> None:
        self.history.append(sent)
        while len(self.history) > self.history_size:
            self.history.popleft()


class Client:
    """One initiator connection on a session: writes numbered messages and resends."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        comp_id: str,
        gap_every: int,
        on_delivered: Callable[[Trade], None],
    ) -> None:
        self.writer = writer
        self.comp_id = comp_id
        self.peer = "?"
        self.session = VenueSession(0)
        self.heartbeat_s = 30.0
        self.last_sent = time.monotonic()
        self.logged_on = False
        self.md_req_id: str | None = None
        self.symbols: frozenset[str] = frozenset()
        self.depth = 1  # MarketDepth served: 1 top of book, else the venue's --depth levels
        self.gaps_injected = 0
        self._gap_every = gap_every
        self._md_sent = 0
        self._on_delivered = on_delivered

    def send(
        self,
        msg_type: str,
        fields: Sequence[tuple[int, FieldValue]],
        now_ms: int,
        trade: Trade | None = None,
    ) -> None:
        session = self.session
        seq = session.out_seq
        session.out_seq += 1
        session.remember(Sent(seq, msg_type, fields, now_ms, trade))
        if msg_type in ("W", "X") and self._gap_every:
            self._md_sent += 1
            if self._md_sent % self._gap_every == 0:
                self.gaps_injected += 1
                return  # the injected gap: numbered and kept, never written
        self._write(msg_type, fields, seq, now_ms)
        if trade is not None:
            self._on_delivered(trade)

    def resend(self, begin: int, end: int, now_ms: int) -> int:
        """Answer a ResendRequest for ``begin``..``end`` (0: all); returns messages resent."""
        last = self.session.out_seq - 1
        end = last if end == 0 or end > last else end
        kept = {s.seq: s for s in self.session.history if begin <= s.seq <= end}
        fill_from: int | None = None
        resent = 0
        for seq in range(begin, end + 1):
            sent = kept.get(seq)
            if sent is None or sent.msg_type not in _APP:
                fill_from = seq if fill_from is None else fill_from
                continue
            if fill_from is not None:
                self._gap_fill(fill_from, seq, now_ms)
                fill_from = None
            orig = format_utc(sent.sent_ms)
            self._write(sent.msg_type, [(43, "Y"), (122, orig), *sent.fields], seq, now_ms)
            resent += 1
            if sent.trade is not None:
                self._on_delivered(sent.trade)
        if fill_from is not None:
            self._gap_fill(fill_from, end + 1, now_ms)
        return resent

    def _gap_fill(self, seq: int, new_seq: int, now_ms: int) -> None:
        orig = format_utc(now_ms)
        self._write("4", [(43, "Y"), (122, orig), (123, "Y"), (36, new_seq)], seq, now_ms)

    def _write(
        self, msg_type: str, fields: Sequence[tuple[int, FieldValue]], seq: int, now_ms: int
    ) -> None:
        msg = encode(msg_type, fields, sender=self.comp_id, target=self.peer, seq=seq,
                     sending_time=format_utc(now_ms))  # fmt: skip
        self.last_sent = time.monotonic()
        self.writer.write(msg)
