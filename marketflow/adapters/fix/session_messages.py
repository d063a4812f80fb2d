"""Pure helpers of the FIX session: header peeking, message bodies, PossDup validation."""

from __future__ import annotations

from dataclasses import dataclass

from marketflow.adapters.fix.codec import SOH, FieldValue, parse_fields
from marketflow.adapters.fix.timestamps import parse_utc

POSS_DUP = b"\x0143=Y\x01"
# SessionRejectReason (373) values used by the session, with their standard texts.
REQUIRED_TAG_MISSING = (1, "Required tag missing")
VALUE_INCORRECT = (5, "Value is incorrect (out of range) for this tag")
BAD_FORMAT = (6, "Incorrect data format for value")
BAD_TIME = (10, "SendingTime accuracy problem")

Body = list[tuple[int, FieldValue]]


def peek_header(frame: bytes) -> tuple[bytes, int] | None:
    """MsgType and MsgSeqNum, found without splitting the whole message."""
    i = frame.find(b"\x0135=")
    j = frame.find(SOH, i + 4)
    k = frame.find(b"\x0134=", j)
    m = frame.find(SOH, k + 4)
    seq_raw = frame[k + 4 : m]
    if i < 0 or k < 0 or not seq_raw.isdigit():
        return None
    return frame[i + 4 : j], int(seq_raw)


def md_request(symbols: tuple[str, ...], req_id: str, request_type: int, depth: int = 1) -> Body:
    """MarketDataRequest body. The NoMDEntryTypes and NoRelatedSym groups are required in
    FIX 4.4 even to unsubscribe (263=2): QuickFIX rejects a V without 267 (35=3, required
    tag missing) and the old subscription then keeps streaming next to the new one.
    ``depth`` is MarketDepth (264): 1 top of book, N price levels a side."""
    fields: Body = [(262, req_id), (263, request_type), (264, depth)]
    if request_type == 1:
        fields.append((265, 1))
    fields += [(267, 3), (269, 0), (269, 1), (269, 2), (146, len(symbols))]
    fields.extend((55, symbol) for symbol in symbols)
    return fields


def reject_body(ref_seq: int, ref_type: bytes, reason: int, text: str, tag: int | None) -> Body:
    """Session-level Reject (35=3) in FIX 4.4 field order."""
    fields: Body = [(45, ref_seq)]
    if tag is not None:
        fields.append((371, tag))
    fields += [(372, ref_type), (373, reason), (58, text)]
    return fields


@dataclass(frozen=True, slots=True)
class PossDupProblem:
    """Why a PossDup resend is refused: the Reject to send and the reason to count."""

    reason: int
    text: str
    tag: int | None
    counted_as: str
    fatal: bool = False  # QuickFIX also logs out (OrigSendingTime after SendingTime)


def poss_dup_problem(frame: bytes) -> PossDupProblem | None:
    """QuickFIX ``doPossDup``: a resend needs an OrigSendingTime (122) not after its
    SendingTime (52); None when the resend is acceptable."""
    fields = dict(parse_fields(frame))
    orig = fields.get(122)
    if not orig:
        return PossDupProblem(*REQUIRED_TAG_MISSING, 122, "poss_dup_without_orig_sending_time")
    try:
        late = parse_utc(orig) > parse_utc(fields.get(52, b""))
    except ValueError:
        return PossDupProblem(*BAD_FORMAT, 122, "poss_dup_bad_orig_sending_time")
    if late:
        return PossDupProblem(*BAD_TIME, None, "poss_dup_orig_sending_time_late", fatal=True)
    return None
