"""The REST API (aiohttp): prices, statistics, mode switch, health and metrics. JSON only.

User input never produces a 500: unknown symbols/exchanges and missing data answer 404, a bad
period 400, both with ``{"error": "..."}`` (the convention of ``http_common``). The API is
described by the OpenAPI document at ``GET /openapi.json`` (``openapi.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from marketflow.app.health import HealthReport
from marketflow.app.modes import ModeController
from marketflow.app.queries import PriceQueries, Stat
from marketflow.app.stream_hub import StreamHub
from marketflow.app.world_view import WorldView
from marketflow.domain.aggregates import LatestPrice
from marketflow.domain.errors import BadRequest, NotFound
from marketflow.domain.periods import parse_period
from marketflow.entrypoints.http_common import (
    ControlGuard,
    Handler,
    json_response,
    new_app,
    rfc3339,
)
from marketflow.entrypoints.http_dashboard import add_dashboard_routes
from marketflow.entrypoints.http_stream import add_stream_routes
from marketflow.entrypoints.http_worldview import add_worldview_routes
from marketflow.entrypoints.openapi import serve_openapi
from marketflow.settings import StreamSettings

QUERIES: web.AppKey[PriceQueries] = web.AppKey("queries", PriceQueries)
MODES: web.AppKey[ModeController] = web.AppKey("modes", ModeController)
HEALTH: web.AppKey[HealthReport] = web.AppKey("health", HealthReport)
METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("metrics")
LATEST: web.AppKey[LatestAnswers] = web.AppKey("latest_answers")


class LatestAnswers:
    """The serialized /prices/latest answer per (symbol, exchange label), reused while the
    tick it shows is still the newest: polled at thousands of requests per second, most
    answers repeat the previous one, and building one costs more than checking it. Never
    stale: the cached body is used only when the queried tick is the very one it shows.
    Bounded by pairs x (exchanges + "all"): unknown names never get this far (404)."""

    def __init__(self) -> None:
        self._bodies: dict[tuple[str, str], tuple[tuple[str, float, int], bytes]] = {}

    def body(self, lp: LatestPrice, label: str) -> bytes:
        key = (lp.symbol, label)
        shows = (lp.exchange, lp.price, lp.timestamp_ms)
        hit = self._bodies.get(key)
        if hit is not None and hit[0] == shows:
            return hit[1]
        doc: dict[str, Any] = {
            "symbol": lp.symbol,
            "exchange": label,
            "price": lp.price,
            "timestamp": rfc3339(lp.timestamp_ms),
        }
        if label == "all":
            doc["source"] = lp.exchange
        body = orjson.dumps(doc)
        self._bodies[key] = (shows, body)
        return body


async def latest(request: web.Request) -> web.Response:
    symbol = request.match_info["symbol"].upper()  # btcusdt means BTCUSDT
    exchange = request.match_info.get("exchange")
    await request.app[QUERIES].prepare(symbol, exchange)  # other nodes' pairs (Kafka roles)
    lp, label = request.app[QUERIES].latest(symbol, exchange)
    return web.Response(body=request.app[LATEST].body(lp, label), content_type="application/json")


def _stat_handler(stat: Stat) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        symbol = request.match_info["symbol"].upper()  # btcusdt means BTCUSDT
        exchange = request.match_info.get("exchange")
        period_text = request.query.get("period")
        unknown = set(request.query) - {"period"}
        if unknown:
            raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:100]}")
        if len(request.query.getall("period", ())) > 1:
            raise BadRequest("period given more than once")
        period_s = None if period_text is None else parse_period(period_text)
        label = period_text if period_text is not None else "all"
        ans = await request.app[QUERIES].stat(stat, symbol, exchange, period_s, label)
        body: dict[str, Any] = {
            "symbol": ans.symbol,
            "exchange": ans.exchange,
            "price": ans.price,
            "timestamp": rfc3339(ans.timestamp_ms),
            "period": ans.period,
        }
        if stat == "average":
            body["count"] = ans.count
        body["complete"] = ans.complete
        body["incomplete_minutes"] = ans.incomplete_minutes
        if ans.partial:
            body["partial"] = True  # the minute store was down: memory only
        return json_response(body)

    return handle


async def switch_mode(request: web.Request) -> web.Response:
    mode = request.match_info["mode"]
    if mode not in ("live", "test"):
        raise NotFound(f"unknown mode {mode[:16]!r}: use /mode/live or /mode/test")
    now = await request.app[MODES].switch("live" if mode == "live" else "test")
    return json_response({"mode": now})


async def get_mode(request: web.Request) -> web.Response:
    return json_response({"mode": request.app[MODES].mode})


async def health(request: web.Request) -> web.Response:
    return json_response(request.app[HEALTH].build())


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS]()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def build_app(
    queries: PriceQueries,
    modes: ModeController,
    health_report: HealthReport,
    metrics_text: Callable[[], bytes],
    control: ControlGuard | None = None,
    world_view: WorldView | None = None,
    *,
    stream: tuple[StreamHub, StreamSettings] | None = None,
) -> web.Application:
    """The aiohttp application; more routes (e.g. /api/messages) may be added before start.
    ``control`` guards the endpoints that change state (default: loopback clients only).
    ``stream``: the stream hub and its settings, served at /stream and /stream/sse."""
    guard = control if control is not None else ControlGuard()
    app = new_app()
    app[QUERIES] = queries
    app[MODES] = modes
    app[HEALTH] = health_report
    app[METRICS] = metrics_text
    app[LATEST] = LatestAnswers()
    r = app.router
    r.add_get("/prices/latest/{symbol}", latest)
    r.add_get("/prices/latest/{exchange}/{symbol}", latest)
    for stat in ("highest", "lowest", "average"):
        handler = _stat_handler(stat)
        r.add_get(f"/prices/{stat}/{{symbol}}", handler)
        r.add_get(f"/prices/{stat}/{{exchange}}/{{symbol}}", handler)
    r.add_post("/mode/{mode}", guard.protect(switch_mode))
    r.add_get("/mode", get_mode)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", serve_openapi)
    # -- world view: GET /bbo, /bbo/{symbol}, /book/{symbol} (http_worldview.py)
    if world_view is not None:
        add_worldview_routes(app, world_view)
    # -- streaming (issue 13) --
    if stream is not None:
        add_stream_routes(app, *stream)
    # -- the web dashboard (issue 13): GET / and /static/{name} (http_dashboard.py)
    add_dashboard_routes(app)
    return app
