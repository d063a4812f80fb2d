"""The sending half of a FIX session: our MsgSeqNum, its persistence, and what we send."""

from __future__ import annotations

from collections.abc import Callable

from marketflow.adapters.fix.codec import encode
from marketflow.adapters.fix.session_messages import Body, md_request, reject_body
from marketflow.adapters.fix.session_types import SessionConfig, SessionStats, Transport
from marketflow.adapters.fix.timestamps import format_utc

SeqSink = Callable[[int, int], object]
"""Persists ``(next_out, next_in)``; called before a message with a new MsgSeqNum is written."""

_RESUBSCRIBE_MIN_INTERVAL_S = 1.0  # a burst of abandoned gaps asks for one snapshot


class Outbound:
    """Numbers, encodes and writes our messages; ``seq`` is the MsgSeqNum of the next one."""

    def __init__(
        self,
        config: SessionConfig,
        transport: Transport,
        stats: SessionStats,
        *,
        monotonic: Callable[[], float],
        wall_ms: Callable[[], int],
        next_out: int,
        next_in: Callable[[], int],
        persist: SeqSink | None,
    ) -> None:
        self.config = config
        self.seq = next_out
        self.last_sent = monotonic()
        self.md_req_id: str | None = None
        self._transport = transport
        self._stats = stats
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._next_in = next_in
        self._persist = persist
        self._last_resubscribe = -_RESUBSCRIBE_MIN_INTERVAL_S

    def persist(self) -> None:
        if self._persist is not None:
            self._persist(self.seq, self._next_in())

    def send(self, msg_type: str, fields: Body) -> int:
        """Send one message; returns the MsgSeqNum it carried."""
        seq = self.seq
        msg = encode(
            msg_type, fields,
            begin=self.config.begin, sender=self.config.sender, target=self.config.target,
            seq=seq, sending_time=format_utc(self._wall_ms()),
        )  # fmt: skip
        self.seq = seq + 1
        self.persist()  # durable before the venue can see the number
        self._write(msg)
        return seq

    def logon(self, reset: bool) -> None:
        fields: Body = [(98, 0), (108, self.config.heartbeat_s)]
        if reset:
            fields.append((141, "Y"))
        self.send("A", fields)

    def reject(
        self, ref_seq: int, ref_type: bytes, reason: int, text: str, tag: int | None = None
    ) -> None:
        self._stats.rejects_sent += 1
        self.send("3", reject_body(ref_seq, ref_type, reason, text, tag))

    def resend_request(self, begin: int, end: int) -> int:
        self._stats.resend_requests += 1
        return self.send("2", [(7, begin), (16, end)])

    def subscribe(self) -> None:
        self.md_req_id = f"MD-{self.seq}"  # unique: our MsgSeqNum never goes back
        self.send("V", md_request(self.config.symbols, self.md_req_id, 1, self.config.market_depth))

    def resubscribe(self) -> None:
        """Cancel the subscription and ask again: a fresh snapshot (at most once a second)."""
        now = self._monotonic()
        if now - self._last_resubscribe < _RESUBSCRIBE_MIN_INTERVAL_S:
            return
        self._last_resubscribe = now
        self._stats.resubscribes += 1
        if self.md_req_id is not None:  # 263=2: disable the old request before the new one
            self.send(
                "V", md_request(self.config.symbols, self.md_req_id, 2, self.config.market_depth)
            )
        self.subscribe()

    def gap_fill(self, begin_seq: int) -> None:
        """Answer a ResendRequest: nothing of ours is worth replaying, one gap fill covers it.

        A resent message carries PossDupFlag and OrigSendingTime (122, "required for message
        resent as a result of a ResendRequest"; the send time when the original's is unknown).
        """
        now = format_utc(self._wall_ms())
        msg = encode(
            "4", [(43, "Y"), (122, now), (123, "Y"), (36, self.seq)],
            begin=self.config.begin, sender=self.config.sender, target=self.config.target,
            seq=begin_seq, sending_time=now,
        )  # fmt: skip
        self._write(msg)

    def _write(self, msg: bytes) -> None:
        self.last_sent = self._monotonic()
        self._transport.write(msg)
