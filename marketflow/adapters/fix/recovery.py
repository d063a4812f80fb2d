"""Gap recovery bookkeeping of a FIX session: the queue above the gap and the resend range.

QuickFIX (``Session::doTargetTooHigh``, ``generateResendRequest``, ``nextQueued``) queues every
message above the expected MsgSeqNum and asks once for the missing range; this module holds
that queue and range, and splits a long range into ResendRequests of ``chunk_size`` messages
(QuickFIX/J's ResendRequestChunkSize): the next chunk is asked for once the previous one has
arrived. It decides nothing about sockets or the wire; the session sends what it returns.

The session around it (session.py) applies QuickFIX's rules: PossDup resends (43=Y, with an
OrigSendingTime not after SendingTime) fill the gap in order and the held messages are applied
once it closes; a SequenceReset-GapFill counts only at the expected number with a NewSeqNo above
it; a SequenceReset in reset mode is not sequenced but never lowers the expected number (a
Reject answers it); a message below the expected number without PossDup ends the session.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResendRange:
    """What one ResendRequest asks for: 7=BeginSeqNo, 16=EndSeqNo (0: everything after)."""

    begin: int
    end: int


class GapRecovery:
    """Held messages by MsgSeqNum, and the range still being recovered."""

    __slots__ = ("active", "chunk_size", "covered", "end", "last_progress", "queue", "request_seq")

    def __init__(self, chunk_size: int = 0) -> None:
        self.chunk_size = chunk_size
        self.queue: dict[int, bytes] = {}
        self.active = False
        self.end = 0  # the highest MsgSeqNum known to be missing
        self.covered = 0  # the highest missing MsgSeqNum the requests sent so far ask for
        self.request_seq: int | None = None  # our MsgSeqNum of the last ResendRequest
        self.last_progress = 0.0

    def hold(self, seq: int, frame: bytes) -> None:
        self.queue.setdefault(seq, frame)

    def pop(self, expected: int) -> bytes | None:
        return self.queue.pop(expected, None) if self.queue else None

    def discard_below(self, expected: int) -> None:
        """Drop held messages a gap fill or reset has skipped past."""
        if self.queue and min(self.queue) < expected:
            for seq in [s for s in self.queue if s < expected]:
                del self.queue[seq]

    def start(self, expected: int, seq: int, now: float) -> ResendRange:
        """A gap from ``expected`` up to ``seq - 1``: the first request to send."""
        self.active = True
        self.end = seq - 1
        self.last_progress = now
        return self._request(expected)

    def extend(self, seq: int) -> None:
        """A message at ``seq`` arrived while recovering: remember a new hole below it.

        It is asked for once what was requested so far has arrived (``progress``): asking at
        once would only duplicate the resends already on their way."""
        missing = seq - 1
        if missing > self.end and missing not in self.queue:
            self.end = missing

    def progress(self, expected: int, now: float) -> ResendRange | None:
        """The expected number moved to ``expected``: the next request to send, if one is due
        (the next chunk, or a hole that opened after the last request)."""
        self.last_progress = now
        if expected > self.end:
            self.reset()
            return None
        if expected > self.covered:
            return self._request(expected)
        return None

    def reset(self) -> None:
        """The gap is closed (or given up): nothing is being recovered any more."""
        self.active = False
        self.end = self.covered = 0
        self.request_seq = None

    def clear(self) -> None:
        self.reset()
        self.queue.clear()

    def _request(self, begin: int) -> ResendRange:
        size = self.chunk_size
        if size and self.end - begin + 1 > size:
            self.covered = begin + size - 1
            return ResendRange(begin, self.covered)
        self.covered = self.end  # one request (or the last chunk) asks for everything after
        return ResendRange(begin, 0)
