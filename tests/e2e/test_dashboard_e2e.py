"""The dashboard in a real browser: Debian's headless Chromium (driven by playwright, never
``playwright install``) on the daemon's ``/``, with two FIX venue simulators, real PostgreSQL
and Redis, and a control token set.

It sees prices move over ``/stream``, both venues in the world view, a captured FIX message,
a venue that goes silent marked stale (or down once the daemon gives up on its link), the mode
switched by the page's button (asking for the token, which stays in sessionStorage) with the
daemon agreeing, and "stream down, reconnecting" once the daemon stops. Every request the page
makes goes to the daemon's own origin. Screenshots: the test's tmp dir and artifacts/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright

from tests.e2e.conftest import daemon_config
from tests.e2e.procs import ROOT, Daemon, Simulator
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/ensure-servers.sh installs it)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TOKEN = "dashboard-e2e-token-0123456789"  # noqa: S105 - a test value, no secret
ARTIFACTS = ROOT / "artifacts"
WAIT_MS = 20_000  # each expectation polls until this deadline


def fix_message(fields: list[tuple[int, str]]) -> bytes:
    body = "".join(f"{tag}={value}\x01" for tag, value in fields).encode()
    head = f"8=FIX.4.4\x019={len(body)}\x01".encode()
    return head + body + f"10={sum(head + body) % 256:03d}\x01".encode()


@dataclass
class Dash:
    daemon: Daemon
    a: Simulator
    b: Simulator
    page: Page
    base: str
    requests: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def launch(pw: Playwright, profile: Path) -> BrowserContext:
    """Debian's Chromium, headless, in a fresh profile: nothing is downloaded."""
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: run make server-binaries"
    return pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 1100},
    )


@pytest.fixture
def dash(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[Dash]:
    # Both books wander (each step at most 2e-5 of the mid, pulled back to the start), and
    # venue_b's sits 4e-4 higher with half-spreads of 1e-4: its bid is always above venue_a's
    # ask, so the world view is crossed while both quote.
    venue = ("--rate", "20", "--spread", "1e-4", "--volatility", "2e-5", "--revert", "0.5")
    a = Simulator(tmp_path, "venue_a", "fix", *venue, "--depth", "3", "--comp-id", "VA")
    b = Simulator(tmp_path, "venue_b", "fix", *venue, "--offset", "4e-4", "--comp-id", "VB")
    a.start()
    b.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    fix = {"host": "127.0.0.1", "protocol": "fix", "heartbeat_s": 1}
    config["exchanges"] = [
        {"name": "venue_a", "port": a.port, "target_comp_id": "VA", "market_depth": 3, **fix},
        {"name": "venue_b", "port": b.port, "target_comp_id": "VB", **fix},
    ]
    daemon = Daemon(tmp_path, config)
    daemon.env["MARKETFLOW_HTTP__CONTROL_TOKEN"] = TOKEN
    daemon.start()
    base = f"http://127.0.0.1:{daemon.port}"
    try:
        with sync_playwright() as pw:
            context = launch(pw, tmp_path / "chromium-profile")
            try:
                page = context.new_page()
                d = Dash(daemon, a, b, page, base)

                def same_origin_only(route: Any) -> None:
                    url = route.request.url
                    if url == base or url.startswith(base + "/"):
                        route.continue_()
                    else:  # the page must work with no network beyond the daemon
                        d.foreign.append(url)
                        route.abort()

                context.route("**/*", same_origin_only)
                page.on("request", lambda r: d.requests.append(r.url))
                page.on("websocket", lambda ws: d.websockets.append(ws.url))
                page.on("pageerror", lambda exc: d.errors.append(str(exc)))
                yield d
            finally:
                context.close()
    finally:
        if b.proc is not None and b.proc.poll() is None:
            os.kill(b.proc.pid, signal.SIGCONT)  # a stopped process cannot take its SIGTERM
        daemon.stop()
        a.stop()
        b.stop()


def screenshot(page: Page, tmp: Path, name: str) -> None:
    """Into the test's tmp dir, and artifacts/ (ignored by git) for a person to look at."""
    path = tmp / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / name)


@pytest.mark.timeout(240)
def test_dashboard_shows_prices_world_view_fix_mode_switch_stale_venue_and_stream_loss(
    dash: Dash, tmp_path: Path
) -> None:
    page, d = dash.page, dash.daemon
    page.goto(dash.base + "/")
    expect(page.locator("#stream-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)

    # prices arrive over /stream and move
    price = page.locator('.card[data-symbol="BTCUSDT"] tr[data-exchange="venue_a"] .price')
    expect(price).to_have_text(re.compile(r"^\d+\.\d+$"), timeout=WAIT_MS)
    first = price.inner_text()
    expect(price).not_to_have_text(first, timeout=WAIT_MS)
    expect(page.locator('.card[data-symbol="BTCUSDT"] canvas')).to_be_visible()

    # the world view combines both venues, crossed (venue_b's bid over venue_a's ask)
    bbo = page.locator('#bbo tr[data-symbol="BTCUSDT"]')
    expect(bbo).to_contain_text("venue_a, venue_b", timeout=WAIT_MS)
    expect(bbo).to_have_attribute("data-dropped", "")
    expect(bbo).to_have_attribute("data-crossed", "true", timeout=WAIT_MS)
    expect(bbo.locator(".mark.crossed")).to_have_text("CROSSED")

    # feed health from /health: both links up
    for venue in ("venue_a", "venue_b"):
        expect(page.locator(f'#feeds tr[data-venue="{venue}"]')).to_have_attribute(
            "data-state", "up", timeout=WAIT_MS
        )

    # a FIX message sent to the capture listener shows in the recent messages
    port = d.get("/health")[1]["capture"]["listener"]["port"]
    order_id = f"DASH-{time.time_ns()}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(fix_message([(35, "D"), (49, "DESK1"), (56, "BROKER"), (34, "4"),
                               (52, "20260101-12:00:00.000"), (11, order_id), (55, "BTCUSDT"),
                               (54, "1"), (38, "1"), (40, "1")]))  # fmt: skip
    expect(page.locator("#fix tbody")).to_contain_text(order_id, timeout=WAIT_MS)
    expect(page.locator("#fix tbody")).to_contain_text("NewOrderSingle")

    # venue_b goes silent (SIGSTOP: the link stays open, nothing arrives): marked stale/down
    assert dash.b.proc is not None
    os.kill(dash.b.proc.pid, signal.SIGSTOP)
    gone = re.compile(r"^(stale|down)$")
    expect(page.locator('#feeds tr[data-venue="venue_b"]')).to_have_attribute(
        "data-state", gone, timeout=WAIT_MS
    )
    expect(bbo).to_have_attribute("data-dropped", "venue_b", timeout=WAIT_MS)
    expect(bbo.locator('.mark[data-venue="venue_b"]')).to_have_text(
        re.compile(r"venue_b (stale|down)")
    )
    expect(bbo).to_have_attribute("data-crossed", "false")  # one venue left: nothing crosses
    expect(page.locator('#feeds tr[data-venue="venue_a"]')).to_have_attribute("data-state", "up")
    screenshot(page, tmp_path, "dashboard.png")

    # the mode switch: the daemon has a token, so the page asks for it once, keeps it for the tab
    assert d.get("/mode") == (200, {"mode": "live"})
    expect(page.locator("#mode")).to_have_text("live")
    page.click("#mode-test")
    expect(page.locator("#token-form")).to_be_visible(timeout=WAIT_MS)
    page.fill("#token-input", TOKEN)
    page.click('#token-form button[type="submit"]')
    expect(page.locator("#mode")).to_have_text("test", timeout=WAIT_MS)
    assert d.get("/mode") == (200, {"mode": "test"})
    assert page.evaluate("sessionStorage.getItem('marketflow.controlToken')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    page.click("#mode-live")  # the kept token: no second prompt
    expect(page.locator("#mode")).to_have_text("live", timeout=WAIT_MS)
    assert d.get("/mode") == (200, {"mode": "live"})
    assert d.get("/health")[1]["http"]["control_unauthorized"] == 1  # only the first try
    # another site's page cannot switch it, token or not (the browser names the page: Origin)
    foreign = {"Origin": "http://elsewhere.example", "Authorization": f"Bearer {TOKEN}"}
    assert d.request("POST", "/mode/test", foreign)[0] == 403
    assert d.get("/mode") == (200, {"mode": "live"})

    # the daemon goes away: the page says so and keeps reconnecting
    d.stop()
    expect(page.locator("#stream-state")).to_have_text(
        re.compile(r"stream down, reconnecting in \d+ s"), timeout=WAIT_MS
    )
    expect(page.locator("#health-state")).to_have_text("health: unreachable", timeout=WAIT_MS)
    screenshot(page, tmp_path, "dashboard-stream-down.png")

    assert dash.errors == []
    assert dash.foreign == []
    assert dash.requests, "no request recorded"
    assert all(u.startswith(dash.base + "/") for u in dash.requests), dash.requests
    ws_base = dash.base.replace("http://", "ws://")
    assert dash.websockets
    assert all(u == ws_base + "/stream" for u in dash.websockets), dash.websockets
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
