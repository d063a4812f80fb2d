"""Lean FIX bytes codec: framing, field splitting and encoding, no simplefix on the hot path.

simplefix costs many times more per market-data message than splitting on SOH. The framer takes
raw socket chunks, cuts them into complete ``8=...10=xxx<SOH>`` messages and validates the
three framing fields in the order the standard puts them: BeginString first, BodyLength second
(and exact: the CheckSum field must start right where it says the body ends), CheckSum last.
Anything else (garbage, truncated or garbled messages) comes out as a FrameReject with the
reason and the bytes, and the framer resynchronises on the next ``8=FIX``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from zlib import adler32

SOH = b"\x01"
Frame = bytes
"""One complete, validated FIX message, from ``8=`` to the SOH after ``10=xxx``."""

_START = b"8=FIX"
# FIX.4.0 .. FIX.4.4, FIX.5.0 (SP1/SP2) as some venues send it, and FIXT.1.1 (the 5.0 transport).
_BEGIN_STRINGS = frozenset(
    (
        *(b"FIX.4.%d" % minor for minor in range(5)),
        *(b"FIX.5.0", b"FIX.5.0SP1", b"FIX.5.0SP2", b"FIXT.1.1"),
    )
)
_BEGIN_FIELD_MAX = 2 + 10 + 1  # "8=" + longest BeginString + SOH
_LENGTH_DIGITS_MAX = 9
# A complete header of another message inside a message that has not fully arrived means
# that message was cut short: reject it now instead of waiting for BodyLength bytes.
_EMBEDDED_HEADER = re.compile(rb"8=FIXT?\.\d\.\d[A-Z0-9]{0,3}\x019=\d{1,9}\x01")
_EMBEDDED_MAX = 26  # the longest match: "8=FIXT.1.1" + 3 + SOH + "9=" + 9 digits + SOH
REQUIRED_HEADER_TAGS = (35, 49, 56, 34, 52)
# BeginString (one of _BEGIN_STRINGS) and BodyLength: the fast path of FixFramer.feed.
_HEAD = re.compile(rb"8=(?:FIX\.4\.[0-4]|FIX\.5\.0(?:SP[12])?|FIXT\.1\.1)\x019=(\d{1,9})\x01")
_TRAILERS = tuple(b"10=%03d\x01" % value for value in range(256))
# Adler-32's low half is 1 + the byte sum modulo 65521: exact up to 256 bytes of any value,
# or 515 bytes of ASCII (127 x 515 + 1 < 65521).
_ONE_CALL = 256
_ONE_CALL_ASCII = 515


def checksum(data: bytes | memoryview) -> int:
    """FIX CheckSum: the sum of all bytes modulo 256.

    ``sum()`` walks the bytes as Python ints, one at a time. Adler-32's low half is 1 + the byte
    sum modulo 65521, exact while the sum stays below that: 256 bytes at a time it always does,
    and zlib computes it in C.
    """
    view = memoryview(data)
    total = 0
    for i in range(0, len(view), 256):
        total += (adler32(view[i : i + 256]) & 0xFFFF) - 1
    return total & 0xFF


@dataclass(frozen=True, slots=True)
class FrameReject:
    """Bytes that are not a valid message: ``reason`` is a short snake_case word."""

    reason: str
    raw: bytes


class FixParseError(ValueError):
    """A field of a framed message is not ``tag=value`` with a positive integer tag."""


class FixFramer:
    """Incremental framer for one byte stream; build a fresh one (or ``reset()``) per connection.

    ``feed()`` returns the complete messages and rejects found so far, in stream order. The
    buffer never holds more than ``max_message_bytes`` plus one chunk (while ``feed`` runs;
    between calls, one partial message under the limit): garbage is discarded as soon as it
    is seen and a BodyLength above the maximum is rejected without waiting for it.

    Framing is linear in the bytes fed, however they are split: once a message's BodyLength
    is known, later reads are kept as parts (not copied into a growing buffer) and only the
    new bytes, with the few before them, are searched for an embedded header, until the
    message is complete.
    """

    __slots__ = ("_buf", "_have", "_need", "_parts", "_tail", "max_message_bytes")

    def __init__(self, max_message_bytes: int = 65536) -> None:
        if max_message_bytes < 32:
            raise ValueError("max_message_bytes must be at least 32")
        self.max_message_bytes = max_message_bytes
        self._buf = b""  # a partial header or a prefix of "8=FIX" (when _need is 0)
        self._parts: list[bytes] = []  # a partial message of known length, as read
        self._have = 0  # bytes in _parts
        self._need = 0  # that message's whole length; 0 when there is none
        self._tail = b""  # its last body bytes: where a header split over two reads starts

    def reset(self) -> None:
        """Forget any partial message (a reconnect must not glue old bytes to new ones)."""
        self._buf = b""
        self._parts = []
        self._have = self._need = 0
        self._tail = b""

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a message."""
        return self._have if self._need else len(self._buf)

    def pending(self) -> bytes:
        """The bytes held while waiting for the rest of a message (e.g. to record them as a
        reject when the peer goes away)."""
        return b"".join(self._parts) if self._need else self._buf

    def feed(self, data: bytes) -> list[Frame | FrameReject]:
        """Append ``data`` and return every message (or reject) it completes."""
        if self._need:
            if self._waiting(data):
                return []
            self._parts.append(data)
            buf = b"".join(self._parts)
            self._parts = []
            self._have = self._need = 0
            self._tail = b""
        else:
            buf = self._buf + data if self._buf else data
        out: list[Frame | FrameReject] = []
        pos = 0
        end = len(buf)
        limit = self.max_message_bytes
        # One adler32 call sums a whole message while its byte sum stays below 65521.
        # (A message of at most span bytes before its trailer is within the limit too.)
        span = min(_ONE_CALL_ASCII if buf.isascii() else _ONE_CALL, limit - 7)
        header, trailers, append = _HEAD.match, _TRAILERS, out.append
        while pos < end:
            head = header(buf, pos)
            if head is not None:  # the common case, checked in full in four C calls
                trailer = head.end() + int(head[1])
                stop = trailer + 7
                # Adler-32 is B << 16 | A, A = 1 + the sum: (adler - 1) & 0xFF is the CheckSum.
                if (
                    stop <= end
                    and trailer - pos <= span
                    and buf.startswith(trailers[(adler32(buf[pos:trailer]) - 1) & 0xFF], trailer)
                ):
                    append(buf[pos:stop])
                    pos = stop
                    continue
                # Anything else (incomplete, too large, a wrong trailer or checksum): below.
            if not buf.startswith(_START, pos):
                start = buf.find(_START, pos)
                if start < 0:
                    # Keep a tail that may be the beginning of "8=FIX"; the rest is garbage.
                    keep = _prefix_tail(buf, max(pos, end - len(_START) + 1))
                    if keep > pos:
                        out.append(FrameReject("garbage", buf[pos : min(keep, pos + limit)]))
                    pos = keep
                    break
                out.append(FrameReject("garbage", buf[pos : min(start, pos + limit)]))
                pos = start
            result = self._one(buf, pos, end, limit)
            if result is None:
                break  # incomplete: wait for more bytes
            if type(result) is int:
                out.append(buf[pos:result])
                pos = result
                continue
            if isinstance(result, tuple):
                reason, stop = result
            else:
                assert isinstance(result, str)
                reason = result
                # Resynchronise on the next "8=FIX" after this start.
                nxt = buf.find(_START, pos + 1)
                stop = nxt if nxt >= 0 else _prefix_tail(buf, max(pos + 1, end - len(_START) + 1))
            out.append(FrameReject(reason, buf[pos : min(stop, pos + limit)]))
            pos = stop
        self._keep(buf, pos, end)
        return out

    def _waiting(self, data: bytes) -> bool:
        """True when ``data`` only extends the pending message of known length (kept);
        False when it completes the message or reveals a header inside it (frame it)."""
        have = self._have + len(data)
        if have >= self._need:
            return False
        # A header not seen yet ends with an SOH in the new bytes: inside them, or starting
        # in the few bytes before them (a match is at most _EMBEDDED_MAX long).
        if SOH in data and (
            _EMBEDDED_HEADER.search(self._tail + data[: _EMBEDDED_MAX - 1]) is not None
            or _EMBEDDED_HEADER.search(data) is not None
        ):
            return False
        self._parts.append(data)
        self._have = have
        if len(data) >= _EMBEDDED_MAX - 1:
            self._tail = data[1 - _EMBEDDED_MAX :]
        else:
            self._tail = (self._tail + data)[1 - _EMBEDDED_MAX :]
        return True

    def _keep(self, buf: bytes, pos: int, end: int) -> None:
        """Hold what follows ``pos``: a message of known length goes to the parts."""
        if pos >= end:
            self._buf = b""
            return
        rest = buf[pos:] if pos else buf
        known = _declared_end(rest)
        if known is None:
            self._buf = rest
            return
        self._buf = b""
        self._need, body = known
        self._parts = [rest]
        self._have = len(rest)
        self._tail = rest[max(body, len(rest) + 1 - _EMBEDDED_MAX) :]

    @staticmethod
    def _one(buf: bytes, pos: int, end: int, limit: int) -> int | str | tuple[str, int] | None:
        """Check the message at ``pos``: its end; a reject reason (resynchronise on the next
        "8=FIX"); a reason and the end of a well-framed bad message; or None (wait for more)."""
        soh = buf.find(SOH, pos + 2, pos + _BEGIN_FIELD_MAX)
        if soh < 0:
            return None if end - pos < _BEGIN_FIELD_MAX else "bad_begin_string"
        if buf[pos + 2 : soh] not in _BEGIN_STRINGS:
            return "bad_begin_string"
        if end - soh < 3:
            return None
        if buf[soh + 1 : soh + 3] != b"9=":
            return "body_length_not_second"
        digits_at = soh + 3
        soh2 = buf.find(SOH, digits_at, digits_at + _LENGTH_DIGITS_MAX + 1)
        if soh2 < 0:
            pending = buf[digits_at:end]
            if len(pending) <= _LENGTH_DIGITS_MAX and (not pending or pending.isdigit()):
                return None
            return "bad_body_length"
        digits = buf[digits_at:soh2]
        if not digits.isdigit():
            return "bad_body_length"
        trailer = soh2 + 1 + int(digits)
        stop = trailer + 7  # "10=xxx" + SOH
        if stop - pos > limit:
            return "message_too_large"
        if stop > end:
            found = _EMBEDDED_HEADER.search(buf, soh2 + 1)
            return "truncated_message" if found and found.start() < trailer else None
        if buf[trailer : trailer + 3] != b"10=" or buf[stop - 1] != 1:
            return "bad_body_length"
        value = buf[trailer + 3 : stop - 1]
        if not value.isdigit() or int(value) != checksum(memoryview(buf)[pos:trailer]):
            # Framing is confirmed by BodyLength and the trailer: drop exactly this message.
            return ("bad_checksum", stop)
        return stop


def _declared_end(rest: bytes) -> tuple[int, int] | None:
    """(length, body start) of the incomplete message that ``rest`` starts with, once its
    BodyLength is known (``_one`` has validated the header); None while it is not."""
    soh = rest.find(SOH, 2, _BEGIN_FIELD_MAX)
    if soh < 0:
        return None
    soh2 = rest.find(SOH, soh + 3, soh + 3 + _LENGTH_DIGITS_MAX + 1)
    if soh2 < 0:
        return None
    return soh2 + 1 + int(rest[soh + 3 : soh2]) + 7, soh2 + 1


def _prefix_tail(buf: bytes, start: int) -> int:
    """Index of the earliest suffix of ``buf`` from ``start`` that is a prefix of "8=FIX"."""
    for i in range(start, len(buf)):
        if _START.startswith(buf[i:]):
            return i
    return len(buf)


def parse_fields(frame: bytes) -> list[tuple[int, bytes]]:
    """All ``(tag, value)`` pairs of a framed message, in order, framing fields included."""
    parts = frame.split(SOH)
    if parts[-1]:
        raise FixParseError("message does not end with SOH")
    fields: list[tuple[int, bytes]] = []
    for part in parts[:-1]:
        tag, sep, value = part.partition(b"=")
        if not sep or not tag.isdigit() or tag[0] == 0x30:  # "0": tags are positive, no padding
            raise FixParseError(f"malformed field {part[:40]!r}")
        fields.append((int(tag), value))
    return fields


def missing_header_tags(fields: Sequence[tuple[int, bytes]]) -> list[int]:
    """Required standard-header tags (35, 49, 56, 34, 52) absent or empty in ``fields``."""
    present = {tag for tag, value in fields if value}
    return [tag for tag in REQUIRED_HEADER_TAGS if tag not in present]


FieldValue = str | bytes | int | float


def _value(value: FieldValue) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"Y" if value else b"N"  # FIX booleans; bool is an int in Python
    if isinstance(value, int):
        return str(value).encode()
    if not math.isfinite(value):
        raise ValueError(f"FIX cannot carry a non-finite number: {value!r}")
    text = repr(value)
    if "e" in text or "E" in text:  # FIX decimals have no exponent notation
        text = format(Decimal(text), "f")
    return text.encode()


def encode(
    msg_type: str,
    fields: Sequence[tuple[int, FieldValue]],
    *,
    begin: str = "FIX.4.4",
    sender: str,
    target: str,
    seq: int,
    sending_time: str,
) -> bytes:
    """One complete message: header (8, 9, 35, 49, 56, 34, 52), ``fields``, CheckSum."""
    parts = [
        b"35=" + msg_type.encode(),
        b"49=" + sender.encode(),
        b"56=" + target.encode(),
        b"34=%d" % seq,
        b"52=" + sending_time.encode(),
    ]
    parts.extend(b"%d=%s" % (tag, _value(value)) for tag, value in fields)
    body = SOH.join(parts) + SOH
    head = b"8=" + begin.encode() + SOH + b"9=%d" % len(body) + SOH + body
    return head + b"10=%03d" % checksum(head) + SOH
