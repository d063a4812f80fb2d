"""REST routes of the FIX capture audit trail.

    GET /api/messages?limit=&before_id=&offset=&msg_type=&symbol=&since=
        newest first; limit 1..1000 (default 100); since is RFC 3339 with a zone, or Unix ms.
        -> {"messages": [...], "next_before_id": id or null}
    GET /api/messages/{id}       -> one message: raw, parsed and enriched forms
        (names and enum meanings come from the static FIX dictionary at read time: the store
        keeps only the parsed fields)
    GET /api/messages/rejects?limit=&before_id=  -> {"rejects": [...], "next_before_id": ...}

Bad input (an unknown or repeated parameter, a number out of range, however many digits it
has) answers 400 and an unknown id 404, both with ``{"error": "..."}``; a store that cannot
be reached answers 503 (the convention of ``http_common``, which ``add_message_routes``
gives the app). Timestamps are RFC 3339 UTC ending in ``Z``. ``raw`` shows SOH
as ``|`` for reading; ``raw_base64`` is exact.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from marketflow.domain.capture import (
    EnrichedField,
    MessageQuery,
    StoredMessage,
    StoredReject,
    raw_display,
    raw_from_text,
)
from marketflow.domain.errors import BadRequest, NotFound
from marketflow.entrypoints.http_common import follow_convention, json_response, rfc3339

MAX_LIMIT = 1000
MAX_OFFSET = 100_000
_MAX_ID = 2**63 - 1  # bigint: a larger id is bad input, not a database error
_MAX_SINCE_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_LIST_PARAMS = frozenset({"limit", "before_id", "offset", "msg_type", "symbol", "since"})
_REJECT_PARAMS = frozenset({"limit", "before_id"})


class MessageQueries(Protocol):
    """What the routes need (app.capture.CaptureService)."""

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]: ...

    async def get_message(self, message_id: int) -> StoredMessage | None: ...

    async def list_rejects(
        self, limit: int, before_id: int | None = None
    ) -> list[StoredReject]: ...

    def type_name(self, msg_type: str) -> str | None: ...

    def enrich(self, fields: Sequence[tuple[int, str]]) -> list[EnrichedField]: ...


def _digits(text: str) -> str | None:
    """``text`` without leading zeros when it is plain ASCII digits, else None."""
    if not (text.isascii() and text.isdigit()):
        return None
    return text.lstrip("0") or "0"


def _int(params: Mapping[str, str], name: str, lo: int, hi: int, default: int | None) -> int | None:
    text = params.get(name)
    if text is None or text == "":
        return default
    digits = _digits(text)
    # Longer than ``hi`` is out of range: never hand int() thousands of digits (it raises).
    if digits is None or len(digits) > len(str(hi)) or not lo <= int(digits) <= hi:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}")
    return int(digits)


def _text(params: Mapping[str, str], name: str, max_len: int) -> str | None:
    text = params.get(name)
    if text is None or text == "":
        return None
    if len(text) > max_len or "\x00" in text:
        raise BadRequest(f"{name} must be at most {max_len} characters")
    return text


def parse_since(text: str) -> int:
    """RFC 3339 (with a zone) or Unix epoch milliseconds -> Unix ms; ValueError otherwise."""
    digits = _digits(text)
    if digits is not None:
        if len(digits) > len(str(_MAX_SINCE_MS)):
            raise ValueError("since is out of range")
        ms = int(digits)
    else:
        stamp = datetime.fromisoformat(text.replace("z", "Z"))
        if stamp.tzinfo is None:
            raise ValueError("since needs a time zone (e.g. Z or +00:00)")
        try:
            ms = int(stamp.timestamp() * 1000)
        except (OverflowError, OSError) as exc:
            raise ValueError("since is out of range") from exc
    if not 0 <= ms <= _MAX_SINCE_MS:
        raise ValueError("since is out of range")
    return ms


def _check_params(request: web.Request, allowed: frozenset[str]) -> None:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)[:100]}")
    repeated = sorted(k for k in allowed if len(request.query.getall(k, ())) > 1)
    if repeated:
        raise BadRequest(f"parameter(s) given more than once: {', '.join(repeated)}")


def _iso(ms: int) -> str:
    return rfc3339(ms)


def _summary(m: StoredMessage, names: MessageQueries) -> dict[str, Any]:
    return {
        "id": m.id, "received_at": _iso(m.received_ms), "received_ms": m.received_ms,
        "peer": m.peer, "begin_string": m.begin_string, "msg_type": m.msg_type,
        "msg_type_name": names.type_name(m.msg_type), "sender": m.sender, "target": m.target,
        "seq_num": m.seq_num, "symbol": m.symbol, "raw": raw_display(m.raw),
    }  # fmt: skip


def _detail(m: StoredMessage, names: MessageQueries) -> dict[str, Any]:
    body = _summary(m, names)
    body["raw_base64"] = base64.b64encode(raw_from_text(m.raw)).decode()
    body["parsed"] = [[tag, value] for tag, value in m.fields]
    body["enriched"] = names.enrich(m.fields)
    return body


def add_message_routes(app: web.Application, service: MessageQueries) -> None:
    """Add the audit-trail routes to ``app`` (the rejects route before the ``{id}`` one)."""
    follow_convention(app)

    async def list_messages(request: web.Request) -> web.Response:
        params = request.query
        _check_params(request, _LIST_PARAMS)
        since_text = params.get("since")
        try:
            since = parse_since(since_text) if since_text else None
        except ValueError as exc:
            raise BadRequest(f"since must be RFC 3339 with a zone or epoch ms: {exc}") from None
        limit = _int(params, "limit", 1, MAX_LIMIT, 100)
        assert limit is not None
        query = MessageQuery(
            limit=limit,
            before_id=_int(params, "before_id", 1, _MAX_ID, None),
            offset=_int(params, "offset", 0, MAX_OFFSET, 0) or 0,
            msg_type=_text(params, "msg_type", 16),
            symbol=_text(params, "symbol", 64),
            since_ms=since,
        )
        messages = await service.list_messages(query)
        next_id = messages[-1].id if len(messages) == limit else None
        return json_response(
            {"messages": [_summary(m, service) for m in messages], "next_before_id": next_id}
        )

    async def get_message(request: web.Request) -> web.Response:
        message_id = _int(request.match_info, "id", 1, _MAX_ID, None)
        if message_id is None:
            raise BadRequest("id must be a positive integer")
        message = await service.get_message(message_id)
        if message is None:
            raise NotFound(f"no message with id {message_id}")
        return json_response(_detail(message, service))

    async def list_rejects(request: web.Request) -> web.Response:
        _check_params(request, _REJECT_PARAMS)
        limit = _int(request.query, "limit", 1, MAX_LIMIT, 100)
        assert limit is not None
        before_id = _int(request.query, "before_id", 1, _MAX_ID, None)
        rejects = await service.list_rejects(limit, before_id)
        body = [
            {
                "id": r.id, "received_at": _iso(r.received_ms), "received_ms": r.received_ms,
                "peer": r.peer, "reason": r.reason, "raw": raw_display(r.raw),
            }
            for r in rejects
        ]  # fmt: skip
        next_id = rejects[-1].id if len(rejects) == limit else None
        return json_response({"rejects": body, "next_before_id": next_id})

    app.router.add_get("/api/messages", list_messages)
    app.router.add_get("/api/messages/rejects", list_rejects)
    app.router.add_get("/api/messages/{id}", get_message)
