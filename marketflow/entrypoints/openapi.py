"""The API described as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

The document lists the operations of every route module; what is served keeps only those the
running application has (the audit-trail routes exist only with the capture listener on). A
unit test fails when a route has no documented operation or an operation has no route, and
schemathesis checks every route's answers against this document.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from marketflow.entrypoints.http_common import json_response

_JSON = "application/json"
_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ERROR_REF}}}


def _ok(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": {"$ref": ref}}}}


def _path(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}  # fmt: skip


_SYMBOL = _path("symbol", "a configured pair, any case (btcusdt means BTCUSDT)")
_EXCHANGE = _path("exchange", "a live or test exchange name")
_PERIOD = _query(
    "period",
    "a positive number followed by s, m or h; absent: all stored history",
    {"type": "string"},
)
_LIMIT = _query("limit", "1..1000 (default 100)", {"type": "integer", "minimum": 1,
                                                   "maximum": 1000})  # fmt: skip
_BEFORE_ID = _query(
    "before_id", "only rows with a smaller id", {"type": "integer", "minimum": 1,
                                                 "maximum": 2**63 - 1}
)  # fmt: skip
_NOT_FOUND = _error("unknown symbol or exchange, or no data yet")
_BAD_REQUEST = _error("malformed or unknown query parameter")
_UNAVAILABLE = _error("a store cannot be reached now")


def _price_operation(summary: str, ref: str, with_period: bool) -> dict[str, Any]:
    responses = {"200": _ok(summary, ref), "400": _BAD_REQUEST, "404": _NOT_FOUND,
                 "503": _UNAVAILABLE}  # fmt: skip
    return {"get": {
        "summary": summary,
        "parameters": [_PERIOD] if with_period else [],
        "responses": responses,
    }}  # fmt: skip


def _price_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    latest = "#/components/schemas/Latest"
    paths["/prices/latest/{symbol}"] = {
        "parameters": [_SYMBOL],
        **_price_operation("newest tick across the exchanges of the mode", latest, False),
    }
    paths["/prices/latest/{exchange}/{symbol}"] = {
        "parameters": [_EXCHANGE, _SYMBOL],
        **_price_operation("newest tick of one exchange", latest, False),
    }
    for stat in ("highest", "lowest", "average"):
        ref = "#/components/schemas/Average" if stat == "average" else "#/components/schemas/Stat"
        paths[f"/prices/{stat}/{{symbol}}"] = {
            "parameters": [_SYMBOL],
            **_price_operation(f"{stat} price across the exchanges of the mode", ref, True),
        }
        paths[f"/prices/{stat}/{{exchange}}/{{symbol}}"] = {
            "parameters": [_EXCHANGE, _SYMBOL],
            **_price_operation(f"{stat} price of one exchange", ref, True),
        }
    return paths


def _control_paths() -> dict[str, Any]:
    mode_ref = "#/components/schemas/Mode"
    return {
        "/mode/{mode}": {"post": {
            "summary": "switch the data mode now (a control endpoint)",
            "parameters": [_path("mode", "live or test", {"type": "string",
                                                          "enum": ["live", "test"]})],
            # Bearer token when http.control_token is set; loopback clients only without one.
            "security": [{"controlToken": []}, {}],
            "responses": {"200": _ok("the mode in force", mode_ref),
                          "401": _error("missing or wrong bearer token"),
                          "403": _error("sent by another site's page (Origin header)"),
                          "404": _error("unknown mode")},
        }},
        "/mode": {"get": {"summary": "the mode in force",
                          "responses": {"200": _ok("the mode in force", mode_ref)}}},
    }  # fmt: skip


def _service_paths() -> dict[str, Any]:
    return {
        "/health": {"get": {"summary": "mode, each exchange, storage, cache, queues",
                            "responses": {"200": _ok("the health document",
                                                     "#/components/schemas/Health")}}},
        "/metrics": {"get": {"summary": "Prometheus text format", "responses": {"200": {
            "description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}},
        }}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {
            "200": {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {
                "type": "object"}}}},
        }}},
    }  # fmt: skip


def _message_paths() -> dict[str, Any]:
    list_params = [
        _LIMIT,
        _BEFORE_ID,
        _query("offset", "rows to skip, 0..100000", {"type": "integer", "minimum": 0,
                                                     "maximum": 100_000}),
        _query("msg_type", "FIX MsgType (35)", {"type": "string", "maxLength": 16}),
        _query("symbol", "FIX Symbol (55)", {"type": "string", "maxLength": 64}),
        _query("since", "RFC 3339 with a zone, or Unix ms", {"type": "string"}),
    ]  # fmt: skip
    common = {"400": _BAD_REQUEST, "503": _UNAVAILABLE}
    return {
        "/api/messages": {"get": {
            "summary": "captured FIX messages, newest first", "parameters": list_params,
            "responses": {"200": _ok("a page", "#/components/schemas/MessagePage"), **common},
        }},
        "/api/messages/rejects": {"get": {
            "summary": "captured input that was not a FIX message",
            "parameters": [_LIMIT, _BEFORE_ID],
            "responses": {"200": _ok("a page", "#/components/schemas/RejectPage"), **common},
        }},
        "/api/messages/{id}": {"get": {
            "summary": "one captured message: raw, parsed and enriched",
            "parameters": [_path("id", "message id", {"type": "integer", "minimum": 1,
                                                      "maximum": 2**63 - 1})],
            "responses": {"200": _ok("the message", "#/components/schemas/Message"),
                          "404": _error("no message with this id"), **common},
        }},
    }  # fmt: skip


# -- streaming (issue 13): GET /stream (WebSocket), GET /stream/sse -------------------------
_STREAM_CHANNELS = ["ticks", "bbo", "book", "aggregates", "status"]


def _stream_paths() -> dict[str, Any]:
    """The two streaming routes; the message shapes are in docs/protocols.md."""
    refused = {"403": _error("Origin not allowed (stream.allowed_origins)"),
               "503": _error("stream.max_connections reached (Retry-After)")}  # fmt: skip
    return {
        "/stream": {"get": {
            "summary": "WebSocket stream: send {\"op\": \"subscribe\", \"channels\": [...], "
                       "\"symbols\": [...]}; snapshots then updates at the cadence",
            "responses": {"101": {"description": "switching to the WebSocket protocol"},
                          "400": _error("not a WebSocket upgrade, or query parameters given"),
                          **refused},
        }},
        "/stream/sse": {"get": {
            "summary": "the same channels as Server-Sent Events (Last-Event-ID: a fresh "
                       "snapshot, not a replay)",
            "parameters": [
                _query("channels", "comma-separated: " + ", ".join(_STREAM_CHANNELS),
                       {"type": "string"}) | {"required": True},
                _query("symbols", "comma-separated configured pairs; absent: all",
                       {"type": "string"}),
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "description": "the id of the last event seen", "schema": {"type": "string"}},
            ],
            "responses": {"200": {"description": "an endless event stream", "content": {
                              "text/event-stream": {"schema": {"type": "string"}}}},
                          "400": _error("unknown channel or symbol, or a bad parameter"),
                          **refused},
        }},
    }  # fmt: skip


_TIMESTAMP = {"type": "string", "format": "date-time", "pattern": r"Z$"}
_NULLABLE_ID = {"type": ["integer", "null"]}
_SUMMARY_FIELDS: dict[str, Any] = {
    "id": {"type": "integer"}, "received_at": _TIMESTAMP, "received_ms": {"type": "integer"},
    "peer": {"type": "string"}, "begin_string": {"type": ["string", "null"]},
    "msg_type": {"type": ["string", "null"]}, "msg_type_name": {"type": ["string", "null"]},
    "sender": {"type": ["string", "null"]}, "target": {"type": ["string", "null"]},
    "seq_num": {"type": ["integer", "null"]}, "symbol": {"type": ["string", "null"]},
    "raw": {"type": "string"},
}  # fmt: skip


def _price_schemas() -> dict[str, Any]:
    base = {"symbol": {"type": "string"}, "exchange": {"type": "string"},
            "price": {"type": "number"}, "timestamp": _TIMESTAMP}  # fmt: skip
    stat = {**base, "period": {"type": "string"}, "complete": {"type": "boolean"},
            "incomplete_minutes": {"type": "integer", "minimum": 0},
            "partial": {"type": "boolean"}}  # fmt: skip
    stat_required = ["symbol", "exchange", "price", "timestamp", "period", "complete",
                     "incomplete_minutes"]  # fmt: skip
    return {
        "Latest": {"type": "object", "required": list(base), "additionalProperties": False,
                   "properties": {**base, "source": {"type": "string"}}},
        "Stat": {"type": "object", "required": stat_required, "additionalProperties": False,
                 "properties": stat},
        "Average": {"type": "object", "required": [*stat_required, "count"],
                    "additionalProperties": False,
                    "properties": {**stat, "count": {"type": "integer", "minimum": 0}}},
    }  # fmt: skip


def _other_schemas() -> dict[str, Any]:
    summary = {"type": "object", "required": list(_SUMMARY_FIELDS),
               "properties": _SUMMARY_FIELDS}  # fmt: skip
    return {
        "Error": {"type": "object", "required": ["error"], "additionalProperties": False,
                  "properties": {"error": {"type": "string", "minLength": 1}}},
        "Mode": {"type": "object", "required": ["mode"],
                 "properties": {"mode": {"type": "string", "enum": ["live", "test"]}}},
        "Health": {"type": "object",
                   "required": ["status", "mode", "exchanges", "postgres", "redis", "queues"],
                   "properties": {"status": {"type": "string", "enum": ["ok", "degraded"]},
                                  "mode": {"type": ["string", "null"]},
                                  "http": {"type": "object"},
                                  # how late the event loop ran (max over the last 1-2 s;
                                  # cpu_max_ms: the part that was the daemon's own work)
                                  "loop_lag": {"type": "object", "required": ["max_ms",
                                               "cpu_max_ms", "window_s", "max_ms_ever"]},
                                  # cyclic GC: thresholds, collections per generation, pauses
                                  "gc": {"type": "object", "required": ["threshold",
                                         "collections", "recent"]}}},
        "MessageSummary": summary,
        "Message": {"allOf": [summary, {"type": "object",
                                        "required": ["raw_base64", "parsed", "enriched"]}]},
        "MessagePage": {"type": "object", "required": ["messages", "next_before_id"],
                        "properties": {"messages": {"type": "array", "items": {
                            "$ref": "#/components/schemas/MessageSummary"}},
                            "next_before_id": _NULLABLE_ID}},
        "RejectPage": {"type": "object", "required": ["rejects", "next_before_id"],
                       "properties": {"rejects": {"type": "array", "items": {
                           "type": "object",
                           "required": ["id", "received_at", "received_ms", "peer", "reason",
                                        "raw"],
                           "properties": {"received_at": _TIMESTAMP}}},
                           "next_before_id": _NULLABLE_ID}},
    }  # fmt: skip


# -- world view (http_worldview.py): GET /bbo, /bbo/{symbol}, /book/{symbol}
def _worldview_paths() -> dict[str, Any]:
    bbo_ref = "#/components/schemas/Bbo"
    not_quoted = _error("unknown symbol, or no venue has quoted it yet")
    depth = _query("depth", "levels a side, 1..world_view.max_depth (default 10 or less)",
                   {"type": "integer", "minimum": 1, "maximum": 100})  # fmt: skip
    return {
        "/bbo": {"get": {"summary": "best bid and offer across venues, every quoted pair",
                         "responses": {"200": _ok("every pair", "#/components/schemas/BboAll"),
                                       "400": _BAD_REQUEST}}},
        "/bbo/{symbol}": {"parameters": [_SYMBOL], "get": {
            "summary": "best bid and offer across the venues in the view",
            "responses": {"200": _ok("the view", bbo_ref), "400": _BAD_REQUEST,
                          "404": not_quoted}}},
        "/book/{symbol}": {"parameters": [_SYMBOL], "get": {
            "summary": "the merged book of the venues in the view, best first",
            "parameters": [depth],
            "responses": {"200": _ok("the merged book", "#/components/schemas/Book"),
                          "400": _error("bad depth or unknown query parameter"),
                          "404": not_quoted}}},
    }  # fmt: skip


def _worldview_schemas() -> dict[str, Any]:
    num = {"type": ["number", "null"]}
    side = {
        "type": ["object", "null"],
        "required": ["exchange", "price", "size", "timestamp", "age_ms"],
        "properties": {
            "exchange": {"type": "string"},
            "price": {"type": "number"},
            "size": num,
            "timestamp": _TIMESTAMP,
            "age_ms": {"type": "integer", "minimum": 0},
        },
    }
    dropped = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["exchange", "reason", "last_update"],
            "properties": {
                "exchange": {"type": "string"},
                "reason": {"type": "string", "enum": ["down", "stale", "quote_age"]},
                "last_update": _TIMESTAMP,
            },
        },
    }
    level = {
        "type": "object",
        "required": ["exchange", "price", "amount"],
        "properties": {"exchange": {"type": "string"}, "price": {"type": "number"}, "amount": num},
    }
    bbo = {
        "type": "object",
        "required": [
            "symbol",
            "seq",
            "bid",
            "ask",
            "spread",
            "mid",
            "crossed",
            "locked",
            "venues",
            "dropped",
        ],
        "properties": {
            "symbol": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "bid": side,
            "ask": side,
            "spread": num,
            "mid": num,
            "crossed": {"type": "boolean"},
            "locked": {"type": "boolean"},
            "venues": {"type": "array", "items": {"type": "string"}},
            "dropped": dropped,
        },
    }
    book = {
        "type": "object",
        "required": ["symbol", "seq", "spread", "bids", "asks", "crossed", "locked", "dropped"],
        "properties": {
            "symbol": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "spread": num,
            "bids": {"type": "array", "items": level},
            "asks": {"type": "array", "items": level},
            "crossed": {"type": "boolean"},
            "locked": {"type": "boolean"},
            "dropped": dropped,
        },
    }
    return {"Bbo": bbo, "Book": book,
            "BboAll": {"type": "object", "required": ["bbo"], "properties": {"bbo": {
                "type": "array", "items": {"$ref": "#/components/schemas/Bbo"}}}}}  # fmt: skip


# -- the web dashboard (issue 13): GET /, GET /static/{name} (http_dashboard.py) ------------
def _dashboard_paths() -> dict[str, Any]:
    """The page and its files (plain text, not JSON: the only routes that are not)."""
    text = {"schema": {"type": "string"}}
    return {
        "/": {"get": {
            "summary": "the web dashboard (HTML; its script and style come from /static/)",
            "responses": {"200": {"description": "the page", "content": {"text/html": text}}},
        }},
        "/static/{name}": {"get": {
            "summary": "a file of the dashboard: dashboard.js, dashboard.css, favicon.svg",
            "parameters": [_path("name", "a file name (no folders)")],
            "responses": {"200": {"description": "the file", "content": {
                              "text/javascript": text, "text/css": text, "text/html": text,
                              "image/svg+xml": text}},
                          "404": _error("no such dashboard file")},
        }},
    }  # fmt: skip


# -- pipeline diagnostics (issue 14): GET /diagnostics (http_diagnostics.py)
def _diagnostics_paths() -> dict[str, Any]:
    params = [
        _query("node", "one node's rows (its node.id); omitted: every node",
               {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"}),
        _query("since", "minutes from this one on: RFC 3339 with a zone, or Unix ms",
               {"type": "string"}),
        _query("limit", "1..1440 (default 60)", {"type": "integer", "minimum": 1,
                                                 "maximum": 1440}),
    ]  # fmt: skip
    return {"/diagnostics": {"get": {
        "summary": "pipeline_stats: one row per node and minute, newest first",
        "parameters": params,
        "responses": {"200": _ok("the rows", "#/components/schemas/Diagnostics"),
                      "400": _BAD_REQUEST, "503": _UNAVAILABLE},
    }}}  # fmt: skip


def _diagnostics_schemas() -> dict[str, Any]:
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    row = {
        "type": "object",
        "required": ["node", "role", "minute", "ticks_in", "ticks_out", "rejects", "reconnects",
                     "lag_by_partition", "queue_depths", "write_latency_ms", "written_at"],
        "properties": {
            "node": {"type": "string"}, "role": {"type": "string"}, "minute": _TIMESTAMP,
            "ticks_in": {"type": "integer"}, "ticks_out": {"type": "integer"},
            "rejects": counts, "reconnects": {"type": "integer"},
            "lag_by_partition": counts, "queue_depths": counts,
            "write_latency_ms": {"type": "object", "required": ["n", "p50", "p99"],
                                 "properties": {"n": {"type": "integer"},
                                                "p50": {"type": "number"},
                                                "p99": {"type": "number"}}},
            "written_at": _TIMESTAMP,
        },
    }  # fmt: skip
    return {"Diagnostics": {"type": "object", "required": ["rows", "stored"], "properties": {
        "rows": {"type": "array", "items": row},
        "stored": {"type": "boolean", "description": "false: embedded storage keeps none"},
    }}}  # fmt: skip


def document() -> dict[str, Any]:
    """Every operation of every route module (a fresh copy: callers may change it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "marketflow",
            "version": "1",
            "description": "Prices, statistics, mode switch, health, metrics and the FIX "
            'capture audit trail. Errors are {"error": "..."}; timestamps are RFC 3339 '
            "UTC ending in Z.",
        },
        "paths": {
            **_price_paths(),
            **_control_paths(),
            **_service_paths(),
            **_message_paths(),
            **_worldview_paths(),
            **_stream_paths(),
            **_dashboard_paths(),
            **_diagnostics_paths(),
        },
        "components": {
            "schemas": {
                **_price_schemas(),
                **_other_schemas(),
                **_worldview_schemas(),
                **_diagnostics_schemas(),
            },
            "securitySchemes": {"controlToken": {"type": "http", "scheme": "bearer"}},
        },
    }


def routed_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route of ``app``; HEAD mirrors GET and is left out."""
    ops: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        ops.add((route.method.lower(), route.resource.canonical))
    return ops


def documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in methods}


def document_for(app: web.Application) -> dict[str, Any]:
    """The document, keeping only the operations that ``app`` routes."""
    doc = document()
    routed = routed_operations(app)
    paths: dict[str, Any] = {}
    for path, item in doc["paths"].items():
        ops = {k: v for k, v in item.items() if k == "parameters" or (k, path) in routed}
        if set(ops) - {"parameters"}:
            paths[path] = ops
    doc["paths"] = paths
    return doc


async def serve_openapi(request: web.Request) -> web.Response:
    return json_response(document_for(request.app))
