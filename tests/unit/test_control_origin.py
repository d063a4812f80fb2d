"""The control endpoints refuse a request sent by another site's page (its Origin header):
without a token, loopback is the only check, and any page a loopback user opens could POST."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from pydantic import SecretStr

from marketflow.entrypoints.http_common import ApiError, ControlGuard


class _Transport:
    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default


def _request(origin: str | None, authorization: str | None = None) -> web.Request:
    headers = {"Host": "127.0.0.1:8080"}
    if origin is not None:
        headers["Origin"] = origin
    if authorization is not None:
        headers["Authorization"] = authorization
    return make_mocked_request("POST", "/mode/test", headers=headers, transport=_Transport())


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:8080", "HTTP://127.0.0.1:8080/"])
def test_no_origin_and_the_daemons_own_page_pass(origin: str | None) -> None:
    guard = ControlGuard(None)

    guard.check(_request(origin))

    assert guard.unauthorized == 0


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "http://127.0.0.1:9999", "http://localhost:8080", "null", ""],
)
def test_another_sites_page_is_403_and_counted_even_from_loopback(origin: str) -> None:
    guard = ControlGuard(None)

    with pytest.raises(ApiError) as refused:
        guard.check(_request(origin))

    assert refused.value.status == 403
    assert "Origin" in refused.value.message
    assert guard.stats() == {"control_unauthorized": 1}


def test_a_foreign_page_is_refused_even_with_the_right_token() -> None:
    guard = ControlGuard(SecretStr("s3cret-token"))

    with pytest.raises(ApiError) as refused:
        guard.check(_request("http://evil.example", "Bearer s3cret-token"))
    guard.check(_request("http://127.0.0.1:8080", "Bearer s3cret-token"))

    assert refused.value.status == 403
    assert guard.unauthorized == 1
