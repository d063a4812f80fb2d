"""``GET /diagnostics?node=&since=&limit=``: the pipeline_stats rows, newest first.

``node``: one node's rows (its ``node.id``); omitted: every node's. ``since``: RFC 3339 with
a zone, or Unix ms (rows of minutes starting at or after it). ``limit``: 1..1440 (default
60). Bad input answers 400, a store that cannot be reached 503, both ``{"error": "..."}``.
With the embedded (SQLite) storage no rows are kept: ``{"rows": [], "stored": false}``.
"""

from __future__ import annotations

import re

from aiohttp import web

from marketflow.domain.diagnostics import PipelineStatsRow, PipelineStatsStore
from marketflow.domain.errors import BadRequest
from marketflow.entrypoints.http_common import follow_convention, json_response, rfc3339
from marketflow.entrypoints.http_messages import parse_since

DIAGNOSTICS: web.AppKey[PipelineStatsStore | None] = web.AppKey("diagnostics")
MAX_LIMIT = 1440  # a day of one node's minutes
DEFAULT_LIMIT = 60
_PARAMS = frozenset({"node", "since", "limit"})
_NODE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # settings.NodeSettings.id


def row_json(row: PipelineStatsRow) -> dict[str, object]:
    return {
        "node": row.node_id,
        "role": row.role,
        "minute": rfc3339(row.minute_ms),
        "ticks_in": row.ticks_in,
        "ticks_out": row.ticks_out,
        "rejects": dict(row.rejects),
        "reconnects": row.reconnects,
        "lag_by_partition": dict(row.lag_by_partition),
        "queue_depths": dict(row.queue_depths),
        "write_latency_ms": {
            "n": row.write_count,
            "p50": row.write_p50_ms,
            "p99": row.write_p99_ms,
        },
        "written_at": rfc3339(row.written_ms),
    }


def _params(request: web.Request) -> tuple[str | None, int | None, int]:
    unknown = sorted(set(request.query) - _PARAMS)
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)[:100]}")
    for name in _PARAMS:
        if len(request.query.getall(name, ())) > 1:
            raise BadRequest(f"{name} given more than once")
    node = request.query.get("node") or None
    if node is not None and not _NODE.match(node):
        raise BadRequest("node must be 1-128 characters of A-Z a-z 0-9 _ . -")
    since_text = request.query.get("since") or None
    try:
        since = None if since_text is None else parse_since(since_text)
    except ValueError as exc:
        raise BadRequest(f"since: {str(exc)[:100]}") from exc
    limit_text = request.query.get("limit") or None
    limit = DEFAULT_LIMIT
    if limit_text is not None:
        digits = limit_text.lstrip("0") or "0"
        if not (limit_text.isascii() and limit_text.isdigit()) or len(digits) > 4:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
        limit = int(digits)
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return node, since, limit


async def diagnostics(request: web.Request) -> web.Response:
    node, since, limit = _params(request)  # checked even when nothing is stored
    store = request.app[DIAGNOSTICS]
    if store is None:
        return json_response({"rows": [], "stored": False})
    rows = await store.read_stats(node, since, limit)
    return json_response({"rows": [row_json(r) for r in rows], "stored": True})


def add_diagnostics_routes(app: web.Application, store: PipelineStatsStore | None) -> None:
    """``GET /diagnostics`` on ``app``, reading ``store`` (None: the embedded storage)."""
    follow_convention(app)
    app[DIAGNOSTICS] = store
    app.router.add_get("/diagnostics", diagnostics)
