"""The one HTTP convention of every route: JSON bodies, RFC 3339 ``Z`` timestamps, errors as
``{"error": "..."}``, and a bearer token on the endpoints that change state.

Handlers raise ``ApiError`` (or the domain's ``BadRequest``/``NotFound``, or
``StoreUnavailable``); the ``errors_as_json`` middleware answers them, aiohttp's own HTTP
errors (unknown route, wrong method) and anything unexpected (500, logged) with a JSON body.
``JsonErrorsRunner`` does the same for what aiohttp rejects before any route runs (a request
line or header over its limits, a malformed request).
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from pydantic import SecretStr

from marketflow.domain.errors import BadRequest, NotFound, StoreUnavailable
from marketflow.settings import is_loopback_address

log = logging.getLogger("marketflow.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ECHO = re.compile(r":\s*(?:b'|b\"|bytearray\()")  # where aiohttp starts quoting the request


class ApiError(Exception):
    """An answer other than 2xx: ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def rfc3339(ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC with milliseconds and ``Z``: 2026-11-24T01:10:02.000Z."""
    seconds, millis = divmod(ms, 1000)  # floor: -1 ms is 1969-12-31T23:59:59.999Z
    return f"{_second_text(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    """One second formatted once: answers of the same second (most of them, under load)
    share it, and formatting a datetime costs more than the rest of a small answer."""
    stamp = _EPOCH + timedelta(seconds=seconds)  # exact: no float division
    return stamp.isoformat(timespec="seconds").removesuffix("+00:00")


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response({"error": message[:300]}, status, headers)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except BadRequest as exc:
        return error_response(400, str(exc))
    except NotFound as exc:
        return error_response(404, str(exc))
    except StoreUnavailable:
        return error_response(503, "store unavailable, retry later")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(exc.status, exc.reason, keep)
    except Exception:  # a bug: logged with its traceback, answered 500 JSON, never echoed
        log.exception("http_handler_failed method=%s path=%s", request.method, request.path[:200])
        return error_response(500, "internal error")


def new_app() -> web.Application:
    """An application that follows this module's convention (add routes to it)."""
    return web.Application(middlewares=[errors_as_json])


def follow_convention(app: web.Application) -> None:
    """Make ``app`` answer as ``new_app()`` does (for route modules handed any app)."""
    if errors_as_json not in app.middlewares:
        app.middlewares.append(errors_as_json)


class _JsonErrorsRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own early errors (a request line or header
    over ``max_line_size``/``max_field_size``, a malformed request) with a JSON body."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs, checks the writer
        try:
            detail = HTTPStatus(status).phrase
        except ValueError:
            detail = "error"
        # aiohttp's HttpProcessingError says what was wrong in .message (first line, bounded).
        said = str(getattr(exc, "message", "") or "").strip().splitlines()
        if status < 500 and said:
            what = _ECHO.split(said[0], maxsplit=1)[0].rstrip(" :.")  # never echo the input
            detail = f"{detail}: {what[:200]}" if what else detail
        out = error_response(status, detail)
        out.force_close()
        return out


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorsRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorsRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's pre-routing errors as JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # same state, only the protocol factory differs
        return server


class ControlGuard:
    """Who may call the control endpoints (those that change state).

    With a token: exactly ``Authorization: Bearer <token>``, compared in constant time. Without
    one (the settings allow that only when the API binds to loopback): loopback clients only.
    Every refusal is a 401 JSON error and is counted (``/health`` ``http``, ``/metrics``)."""

    def __init__(self, token: SecretStr | None = None) -> None:
        secret = token.get_secret_value() if token is not None else ""
        self._token = secret.encode("utf-8", "surrogatepass") if secret else None
        self.unauthorized = 0

    def check(self, request: web.Request) -> None:
        self._check_origin(request)
        if self._token is None:
            if is_loopback_address(request.remote):
                return
            self.unauthorized += 1
            raise ApiError(401, "control endpoints need http.control_token for remote clients")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        presented = given.strip().encode("utf-8", "surrogatepass")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented, self._token):
            return
        self.unauthorized += 1
        raise ApiError(
            401,
            "missing or wrong bearer token (Authorization: Bearer <http.control_token>)",
            {"WWW-Authenticate": 'Bearer realm="marketflow"'},
        )

    def _check_origin(self, request: web.Request) -> None:
        """A browser says which page sent a request (``Origin``); one from another site's page
        is refused (403, counted): without a token, any page a loopback user opens could
        otherwise switch the mode with a plain form POST. No Origin (curl, bots) and the
        daemon's own pages (the dashboard at /) pass on to the token or loopback check."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        host = (request.host or "").lower()
        if host and urlsplit(origin.strip().lower()).netloc == host:
            return
        self.unauthorized += 1
        raise ApiError(403, "control endpoints refuse requests from another site's page (Origin)")

    def protect(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            self.check(request)
            return await handler(request)

        return guarded

    def stats(self) -> dict[str, int]:
        return {"control_unauthorized": self.unauthorized}
