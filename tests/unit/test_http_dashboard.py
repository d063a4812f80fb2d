"""GET / and GET /static/{name}: the dashboard's page and files, their content types, no
path traversal, nothing referenced outside the daemon, and every file shipped as package data."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from marketflow.entrypoints.http_common import ControlGuard, new_app
from marketflow.entrypoints.http_dashboard import CONTENT_TYPES, add_dashboard_routes
from tests.unit.test_http_api import build_test_app

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "marketflow" / "entrypoints" / "static"
INDEX_HTML = (STATIC / "index.html").read_text()


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    app = new_app()
    add_dashboard_routes(app)
    async with TestClient(TestServer(app)) as c:
        yield c


def referenced(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


async def test_root_serves_the_page_as_html_with_a_same_origin_policy(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get("/")
    body = await resp.text()

    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<script src="/static/dashboard.js"' in body
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp  # the page has control buttons: never framed
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    head = await client.head("/")
    assert head.status == 200


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("dashboard.js", "text/javascript; charset=utf-8"),
        ("dashboard.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
        ("index.html", "text/html; charset=utf-8"),
    ],
)
async def test_static_files_answer_with_their_content_type(
    client: TestClient[Any, Any], name: str, content_type: str
) -> None:
    resp = await client.get(f"/static/{name}")

    assert resp.status == 200
    assert resp.headers["Content-Type"] == content_type
    assert await resp.read() == (STATIC / name).read_bytes()


async def test_every_file_the_page_names_is_served_by_the_daemon(
    client: TestClient[Any, Any],
) -> None:
    refs = referenced(INDEX_HTML)

    assert len(refs) >= 3  # icon, style, script
    for ref in refs:
        assert ref.startswith("/static/"), f"{ref} is not served by the daemon"
        assert (await client.get(ref)).status == 200, ref


def test_no_file_loads_anything_from_another_origin() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        if path.suffix == ".svg":  # the SVG namespace is a name, never fetched
            text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(?i)(?:https?:|wss?:)?//[a-z0-9.-]+\.[a-z]", text), path.name
        assert "@import" not in text, path.name


@pytest.mark.parametrize(
    "path",
    [
        "/static/../pyproject.toml",
        "/static/..%2F..%2F..%2Fpyproject.toml",
        "/static/%2e%2e%2fhttp_dashboard.py",
        "/static/..%5Chttp_dashboard.py",
        "/static/http_dashboard.py",  # beside the static folder, not in it
        "/static/%2Fetc%2Fpasswd",
        "/static/dashboard.js%00.css",
        "/static/nope.js",
        "/static/",
        "/static/dashboard.js/x",
    ],
)
async def test_only_the_shipped_files_are_served_never_a_path(
    client: TestClient[Any, Any], path: str
) -> None:
    resp = await client.get(URL(path, encoded=True))

    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert "error" in await resp.json()


async def test_a_file_table_given_by_the_caller_is_all_that_is_served() -> None:
    app = new_app()
    add_dashboard_routes(app, {"index.html": (b"<p>hi</p>", "text/html; charset=utf-8")})
    async with TestClient(TestServer(app)) as c:
        assert await (await c.get("/")).text() == "<p>hi</p>"
        assert (await c.get("/static/dashboard.js")).status == 404


async def test_the_daemons_app_serves_the_dashboard() -> None:
    parts = build_test_app(ControlGuard(None))
    async with TestClient(TestServer(parts.app)) as c:
        page = await c.get("/")
        script = await c.get("/static/dashboard.js")

        assert page.status == 200
        assert page.content_type == "text/html"
        assert script.status == 200
        assert "/stream" in await script.text()


def test_every_static_file_is_package_data_with_a_known_content_type() -> None:
    """A non-editable install gets only what pyproject's package-data names."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["marketflow.entrypoints"]
    shipped = {p.name for p in STATIC.iterdir()}

    assert {"index.html", "dashboard.js", "dashboard.css", "favicon.svg"} <= shipped
    for name in shipped:
        assert any(fnmatch.fnmatch(f"static/{name}", g) for g in globs), name
        assert Path(name).suffix in CONTENT_TYPES, name


def test_add_dashboard_routes_adds_only_get_routes() -> None:
    app = web.Application()
    add_dashboard_routes(app)
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}

    assert routes == {
        ("GET", "/"),
        ("HEAD", "/"),
        ("GET", "/static/{name}"),
        ("HEAD", "/static/{name}"),
    }
