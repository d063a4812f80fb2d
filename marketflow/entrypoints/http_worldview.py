"""The world view over REST: GET /bbo, GET /bbo/{symbol}, GET /book/{symbol}?depth=N.

Answers are built by ``WorldView`` (app/world_view.py) from memory: no I/O, no await. A symbol
no venue has quoted (or no pair at all) answers 404, a bad ``depth`` or an unknown query
parameter 400, both as ``{"error": "..."}`` (http_common's convention).
"""

from __future__ import annotations

from aiohttp import web

from marketflow.app.world_view import WorldView
from marketflow.domain.errors import BadRequest, NotFound
from marketflow.entrypoints.http_common import json_response

WORLD: web.AppKey[WorldView] = web.AppKey("world_view", WorldView)
DEFAULT_DEPTH = 10  # DragonflyBot's summary depth; capped by world_view.max_depth


def _symbol(request: web.Request) -> str:
    return request.match_info["symbol"].upper()[:64]  # btcusdt means BTCUSDT


def _no_query(request: web.Request, allowed: frozenset[str] = frozenset()) -> None:
    unknown = set(request.query) - allowed
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:100]}")


def _not_quoted(symbol: str) -> NotFound:
    return NotFound(f"no quotes for {symbol!r}: unknown symbol, or no venue has quoted it yet")


async def bbo_all(request: web.Request) -> web.Response:
    _no_query(request)
    view = request.app[WORLD]
    docs = [doc for s in view.symbols() if (doc := view.bbo(s)) is not None]
    return json_response({"bbo": docs})


async def bbo_one(request: web.Request) -> web.Response:
    _no_query(request)
    symbol = _symbol(request)
    doc = request.app[WORLD].bbo(symbol)
    if doc is None:
        raise _not_quoted(symbol)
    return json_response(doc)


def parse_depth(request: web.Request, max_depth: int) -> int:
    """``depth`` of the query: an integer 1..max_depth (absent: min(10, max_depth))."""
    _no_query(request, frozenset({"depth"}))
    given = request.query.getall("depth", ())
    if not given:
        return min(DEFAULT_DEPTH, max_depth)
    if len(given) > 1:
        raise BadRequest("depth given more than once")
    text = given[0]
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or not 1 <= int(text) <= max_depth:
        raise BadRequest(f"depth must be an integer from 1 to {max_depth}, got {text[:20]!r}")
    return int(text)


async def book(request: web.Request) -> web.Response:
    view = request.app[WORLD]
    depth = parse_depth(request, view.settings.max_depth)
    symbol = _symbol(request)
    doc = view.book(symbol, depth)
    if doc is None:
        raise _not_quoted(symbol)
    return json_response(doc)


def add_worldview_routes(app: web.Application, view: WorldView) -> None:
    """Register the world-view routes on ``app`` (before it starts)."""
    app[WORLD] = view
    r = app.router
    r.add_get("/bbo", bbo_all)
    r.add_get("/bbo/{symbol}", bbo_one)
    r.add_get("/book/{symbol}", book)
