"""The market-data messages of the acceptor side: 35=V parsed, 35=W / X / Y built.

Bodies follow the FIX 4.4 dictionary (QuickFIX validates them with ``UseDataDictionary=Y``):
entries carry MDEntryOriginator (282) for the venue and MDEntryPositionNo (290) for the level
(FIX 4.4 has no MDPriceLevel 1023), in the group's field order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from marketflow.adapters.fix.session_messages import (
    BAD_FORMAT,
    REQUIRED_TAG_MISSING,
    VALUE_INCORRECT,
    Body,
)
from marketflow.domain.md_levels import DELETE, Level, LevelChange, MdRequest

BAD_GROUP_COUNT = (16, "Incorrect NumInGroup count for repeating group")


@dataclass(frozen=True, slots=True)
class RequestProblem:
    """Why a 35=V cannot be read: the session Reject (35=3) to answer it with."""

    reason: int
    text: str
    tag: int


def _int(fields: dict[int, bytes], tag: int, *, required: bool = True) -> int | RequestProblem:
    raw = fields.get(tag)
    if raw is None or raw == b"":
        return RequestProblem(*REQUIRED_TAG_MISSING, tag) if required else -1
    if not raw.isdigit():
        return RequestProblem(*BAD_FORMAT, tag)
    return int(raw)


def parse_md_request(pairs: Sequence[tuple[int, bytes]]) -> MdRequest | RequestProblem:
    """A MarketDataRequest's fields (the whole message, in order) as an MdRequest."""
    fields = dict(pairs)
    req_id = fields.get(262, b"").decode(errors="replace")
    if not req_id:
        return RequestProblem(*REQUIRED_TAG_MISSING, 262)
    values: list[int | RequestProblem] = [_int(fields, t) for t in (263, 264, 267, 146)]
    for value in values:
        if isinstance(value, RequestProblem):
            return value
    kind, depth, n_types, n_symbols = (v for v in values if isinstance(v, int))
    if kind not in (0, 1, 2):
        return RequestProblem(*VALUE_INCORRECT, 263)
    types = [v for t, v in pairs if t == 269]
    if len(types) != n_types or n_types == 0:
        return RequestProblem(*BAD_GROUP_COUNT, 267)
    if any(not t.isdigit() for t in types):
        return RequestProblem(*BAD_FORMAT, 269)
    symbols = [v.decode(errors="replace") for t, v in pairs if t == 55]
    if len(symbols) != n_symbols or n_symbols == 0:
        return RequestProblem(*BAD_GROUP_COUNT, 146)
    update = _int(fields, 265, required=False)
    if isinstance(update, RequestProblem):
        return update
    sides = frozenset(int(t) for t in types)
    return MdRequest(req_id, kind, depth, sides, tuple(symbols), update)


def _entry(level: Level) -> Body:
    body: Body = [(270, level.price)]
    if level.size is not None:
        body.append((271, level.size))
    body.append((282, level.venue))
    return body


def snapshot_body(req_id: str, symbol: str, bids: Sequence[Level], offers: Sequence[Level]) -> Body:
    """35=W: every level of both sides (268=0 when the symbol has no quote)."""
    body: Body = [(262, req_id), (55, symbol), (268, len(bids) + len(offers))]
    for side, levels in ((0, bids), (1, offers)):
        for pos, level in enumerate(levels, 1):
            body += [(269, side), *_entry(level), (290, pos)]
    return body


def incremental_body(req_id: str, symbol: str, changes: Sequence[LevelChange]) -> Body:
    """35=X: one entry per level change (279 action, 269 side, 55, 270, 271, 282, 290)."""
    body: Body = [(262, req_id), (268, len(changes))]
    for c in changes:
        body += [(279, c.action), (269, c.side), (55, symbol)]
        if c.action == DELETE:
            body += [(270, c.level.price), (282, c.level.venue)]
        else:
            body += _entry(c.level)
        body.append((290, c.position))
    return body


def request_reject_body(req_id: str, reason: int, text: str) -> Body:
    """35=Y MarketDataRequestReject."""
    return [(262, req_id), (281, reason), (58, text)]
