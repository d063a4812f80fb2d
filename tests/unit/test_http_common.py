"""The HTTP convention: JSON errors everywhere, RFC 3339 Z timestamps, the control token."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from pydantic import SecretStr

from marketflow.domain.errors import ConfigError, StoreUnavailable
from marketflow.entrypoints.http_common import (
    ApiError,
    ControlGuard,
    JsonErrorsRunner,
    new_app,
    rfc3339,
)
from marketflow.settings import HttpSettings, is_loopback_address, load_settings


def test_rfc3339_is_utc_with_milliseconds_and_z() -> None:
    assert rfc3339(1_795_482_602_000) == "2026-11-24T01:10:02.000Z"
    assert rfc3339(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    "ms", [0, 1, 999, 1000, 59_999, -1, -999, -1000, -1001, 1_795_482_659_999, 253_402_300_799_999]
)
def test_rfc3339_matches_datetime_at_every_millisecond_edge(ms: int) -> None:
    reference = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    expected = reference.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert rfc3339(ms) == expected
    assert rfc3339(ms) == expected  # the cached second gives the same text again


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail")


async def _unavailable(request: web.Request) -> web.Response:
    raise StoreUnavailable("pg down at 10.0.0.1")


async def _teapot(request: web.Request) -> web.Response:
    raise ApiError(418, "short and stout", {"X-Why": "test"})


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    app = new_app()
    app.router.add_get("/boom", _boom)
    app.router.add_get("/unavailable", _unavailable)
    app.router.add_get("/teapot", _teapot)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_every_error_is_a_json_body(client: TestClient[Any, Any]) -> None:
    answers = {}
    for method, path in [("GET", "/boom"), ("GET", "/unavailable"), ("GET", "/teapot"),
                         ("GET", "/nope"), ("POST", "/boom")]:  # fmt: skip
        resp = await client.request(method, path)
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert set(body) == {"error"}
        answers[(method, path)] = (resp.status, body["error"], resp.headers)

    assert answers[("GET", "/boom")][:2] == (500, "internal error")  # the detail is not echoed
    assert answers[("GET", "/unavailable")][:2] == (503, "store unavailable, retry later")
    assert answers[("GET", "/teapot")][:2] == (418, "short and stout")
    assert answers[("GET", "/teapot")][2]["X-Why"] == "test"
    assert answers[("GET", "/nope")][0] == 404
    assert answers[("POST", "/boom")][0] == 405
    assert answers[("POST", "/boom")][2]["Allow"] == "GET,HEAD"


async def _raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()  # the server closes after an early error
    writer.close()
    await writer.wait_closed()
    return data


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # over max_line_size
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",  # max_field_size
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",  # malformed
    ],
)
async def test_requests_aiohttp_rejects_before_routing_get_a_json_4xx(
    request_bytes: bytes,
) -> None:
    runner = JsonErrorsRunner(new_app(), access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        await web.SockSite(runner, sock).start()
        raw = await _raw_exchange(sock.getsockname()[1], request_bytes)
    finally:
        await runner.cleanup()

    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert 400 <= status < 500, raw[:300]
    assert b"application/json" in head.lower()
    error = orjson.loads(body)["error"]
    assert error.startswith("Bad Request"), error
    assert b"aaaa" not in body
    assert b"bbbb" not in body


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._peer if name == "peername" else default


def _request(peer: str, authorization: str | None = None) -> web.Request:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return make_mocked_request(
        "POST", "/mode/test", headers=headers, transport=_Transport((peer, 50000))
    )


def test_without_a_token_only_loopback_clients_may_control() -> None:
    guard = ControlGuard(None)

    guard.check(_request("127.0.0.1"))
    guard.check(_request("::1"))
    with pytest.raises(ApiError) as refused:
        guard.check(_request("192.0.2.7"))

    assert refused.value.status == 401
    assert guard.stats() == {"control_unauthorized": 1}


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", "Basic s3cret-token", "Bearer s3cret-token-and-more",
     "Bearer s3crét-token"],
)  # fmt: skip
def test_a_missing_or_wrong_token_is_401_and_counted_even_from_loopback(
    authorization: str | None,
) -> None:
    guard = ControlGuard(SecretStr("s3cret-token"))

    with pytest.raises(ApiError) as refused:
        guard.check(_request("127.0.0.1", authorization))

    assert refused.value.status == 401
    assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert guard.unauthorized == 1


def test_the_right_token_is_accepted_from_anywhere() -> None:
    guard = ControlGuard(SecretStr("s3cret-token"))

    guard.check(_request("192.0.2.7", "Bearer s3cret-token"))
    guard.check(_request("127.0.0.1", "bearer s3cret-token"))

    assert guard.unauthorized == 0


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
     ("192.168.1.5", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback_address(host) is loopback


def test_no_token_beyond_loopback_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETFLOW_HTTP__HOST", "0.0.0.0")
    monkeypatch.setenv("MARKETFLOW_HTTP__CONTROL_TOKEN", "")  # empty counts as not set

    with pytest.raises(ConfigError, match=r"not a loopback address and no http\.control_token"):
        load_settings(None)

    monkeypatch.setenv("MARKETFLOW_HTTP__CONTROL_TOKEN", "s3cret-token")
    http = load_settings(None).http
    assert http.control_token is not None
    assert http.control_token.get_secret_value() == "s3cret-token"
    assert "s3cret" not in repr(http)
    assert HttpSettings().control_token is None  # loopback needs none
