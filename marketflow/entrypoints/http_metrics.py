"""HTTP request latency per route, for ``marketflow_http_request_duration_seconds``.

The label is the route's canonical pattern (``/prices/latest/{symbol}``), never the raw path:
a client asking for a million different symbols still makes one series per route. Requests
that match no route (404, 405) share the label ``UNMATCHED``. One ``perf_counter`` pair and
one bucket lookup per request, kept in plain lists until a scrape reads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from marketflow.app.loop_health import Histogram
from marketflow.entrypoints.http_common import Handler

UNMATCHED = "unmatched"
# Streaming routes last as long as the client stays: their "latency" is a session length.
LONG_LIVED = frozenset({"/stream", "/stream/sse"})
# An answer from memory takes well under a millisecond; a stored-minutes query a few.
HTTP_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


def route_label(request: web.Request) -> str:
    """The canonical path pattern of the route that served ``request``, or ``UNMATCHED``."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


class HttpMetrics:
    """Request durations per route label (bounded by the routes the app registers)."""

    def __init__(
        self,
        timer: Callable[[], float] = time.perf_counter,
        long_lived: frozenset[str] = LONG_LIVED,
    ) -> None:
        self._timer = timer
        self._long_lived = long_lived
        self.by_route: dict[str, Histogram] = {}

    def observe(self, route: str, seconds: float) -> None:
        h = self.by_route.get(route)
        if h is None:
            h = self.by_route[route] = Histogram(HTTP_BUCKETS_S)
        h.observe(seconds)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = self._timer()
        try:
            return await handler(request)
        finally:
            route = route_label(request)
            if route not in self._long_lived:
                self.observe(route, self._timer() - started)

    def install(self, app: web.Application) -> None:
        """Time every request of ``app`` (call before the app starts; inside the JSON-errors
        middleware, so error answers are timed too)."""
        app.middlewares.append(self.middleware)
