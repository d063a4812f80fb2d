"""The web dashboard: ``GET /`` (the page) and ``GET /static/{name}`` (its script, style and
icon), plain files shipped in ``marketflow/entrypoints/static/`` (package data: no build step,
no CDN, nothing fetched from anywhere but this daemon).

The files are read once when the routes are added, so a request never touches the disk and
``{name}`` is only ever a key of that fixed table: a path (``../``, ``%2e%2e``, a subfolder)
is an unknown name, answered 404 JSON like any other unknown route. Every answer forbids
framing (the page has control buttons) and content sniffing; the policy lets the page load
and connect to its own origin only.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from marketflow.domain.errors import NotFound
from marketflow.entrypoints.http_common import follow_convention

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
HEADERS = {
    # 'self' covers ws:// to the same host and port (CSP level 3): the page's /stream.
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded daemon serves its own page at once
}
INDEX = "index.html"

StaticFiles = dict[str, tuple[bytes, str]]
DASHBOARD_FILES: web.AppKey[StaticFiles] = web.AppKey("dashboard_files", dict)


def load_static() -> StaticFiles:
    """name -> (bytes, content type) of every servable file of the package's static folder
    (subfolders and unknown suffixes are left out: nothing else can ever be served)."""
    folder = resources.files("marketflow.entrypoints").joinpath("static")
    files: StaticFiles = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind(".") :] if "." in entry.name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    if INDEX not in files:
        raise RuntimeError(f"the dashboard's {INDEX} is missing from the installed package")
    return files


def _answer(files: StaticFiles, name: str) -> web.Response:
    held = files.get(name)
    if held is None:
        raise NotFound(f"no dashboard file {name[:64]!r}")
    body, content_type = held
    response = web.Response(body=body, headers=HEADERS)
    response.headers["Content-Type"] = content_type
    return response


async def index(request: web.Request) -> web.Response:
    return _answer(request.app[DASHBOARD_FILES], INDEX)


async def static_file(request: web.Request) -> web.Response:
    return _answer(request.app[DASHBOARD_FILES], request.match_info["name"])


def add_dashboard_routes(app: web.Application, files: StaticFiles | None = None) -> None:
    """``GET /`` and ``GET /static/{name}`` on ``app`` (``files``: tests give their own)."""
    follow_convention(app)
    app[DASHBOARD_FILES] = load_static() if files is None else files
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_file)
