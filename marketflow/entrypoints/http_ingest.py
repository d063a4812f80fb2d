"""The ingest role's HTTP server: ``GET /health`` and ``GET /metrics`` only.

An ingest node holds no windows, minutes or books (the aggregate nodes do), so the price,
world-view, stream and control routes are not served here: every other path is a 404 JSON
error. /health says which feeds this node owns, their link state, and the broker's state
with what is held back or spilled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from marketflow.entrypoints.http_common import json_response, new_app


def build_ingest_app(
    health: Callable[[], dict[str, Any]], metrics_text: Callable[[], str]
) -> web.Application:
    async def get_health(_: web.Request) -> web.Response:
        return json_response(health())

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(text=metrics_text(), content_type="text/plain", charset="utf-8")

    app = new_app()
    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    return app
