"""Hostile input: a JSON feed that sends garbage, and bad requests to the REST API.

The feed is a small socket server in this test, so every byte is known: the rejects per
reason, the valid ticks and therefore the stored minute rows are all exact.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import daemon_config
from tests.e2e.procs import Daemon, assert_real_stack, minute_rows
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

FEED = "hostile"
Tick = tuple[str, float, int]


def line(symbol: object, price: object, ts: object) -> bytes:
    return orjson.dumps({"symbol": symbol, "price": price, "timestamp": ts}) + b"\n"


def raw_line(price_text: str, ts: int, symbol: str = "BTCUSDT") -> bytes:
    return f'{{"symbol":"{symbol}","price":{price_text},"timestamp":{ts}}}\n'.encode()


@dataclass
class HostileFeed:
    """Plays a script on the first connection, another on the second, then holds the rest."""

    first: list[bytes]
    second: list[bytes]
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    connections: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    # The daemon's ticks + rejects so far: the next piece goes after it moved (a separate read).
    progress: Callable[[], int] | None = None
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _held: list[socket.socket] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            self.connections += 1
            if self.connections == 1:
                self._play(conn, self.first)
                conn.close()  # mid-line: the next connection must not continue it
            elif self.connections == 2:
                self._play(conn, self.second)
                self.done.set()
                self._held.append(conn)
            else:
                self._held.append(conn)

    def _play(self, conn: socket.socket, script: list[bytes]) -> None:
        for i, piece in enumerate(script):
            before = self._wait_progress(-1) if self.progress else 0  # -1: no answer yet
            try:
                conn.sendall(piece)
            except OSError:  # the daemon went away: the test's assertions will tell
                return
            if self.progress is not None and i < len(script) - 1:
                self._wait_progress(before)

    def _wait_progress(self, before: int) -> int:
        """Poll until the daemon's count moves off ``before`` (it read the piece just sent)."""
        assert self.progress is not None
        deadline = time.monotonic() + 20
        while (now := self.progress()) == before:
            if time.monotonic() > deadline:
                self.errors.append(f"the daemon counted nothing new after {before}")
                break
            time.sleep(0.02)
        return now

    def start(self) -> None:
        threading.Thread(target=self.serve, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        for c in self._held:
            c.close()
        self.sock.close()


def hostile_script() -> tuple[list[bytes], list[bytes], list[Tick], dict[str, int]]:
    """Both connections' bytes, the valid ticks among them and the rejects per reason."""
    now = time.time_ns() // 1_000_000
    garbage = b"".join(
        [
            b"\x00\xff\xfe this is not json at all\n",
            raw_line("NaN", now),
            raw_line("1e999", now),
            b"\n\r\n   \n",  # blank lines are not errors
            line("BTCUSDT", "100.5", now)[:-1] + b"\r\n",  # CRLF, a price as a string
            line("BTCUSDT", True, now),
            line("BTCUSDT", -5, now),
            line("BTCUSDT", 0, now),
            raw_line("-0.0", now),
            line("BTCUSDT", None, now),
            line("XRPUSDT", 1.5, now),
            line("btcusdt", 1.5, now),
            line(["BTCUSDT"], 1.5, now),
            line("BTCUSDT", 1.5, now // 1000),  # seconds, not milliseconds
            line("BTCUSDT", 1.5, "now"),
            b"[1,2,3]\n",
            b'{"symbol":"BTCUSDT","price":1.5}\n',
        ]
    )
    huge = b'{"symbol":"BTCUSDT","price":9.5,"pad":"' + b"x" * 300_000 + b'"}\n'
    valid: list[Tick] = [("SOLUSDT", 201.5, now), ("SOLUSDT", 202.5, now + 1)]
    valid += [("SOLUSDT", 203.5, now + 2)]
    # Chunks that are otherwise clean JSON lines: each line must still be judged alone.
    glued_halves = (
        line(*valid[0]) + b'{"symbol":"BTCUSDT","price":555.5\n"timestamp":%d}\n' % now
    ) + line(*valid[1])
    two_on_one_line = (
        line(*valid[2]) + line("ETHUSDT", 777.7, now)[:-1] + b"," + line("ETHUSDT", 777.7, now)
    )
    half_line = b'{"symbol":"BTCUSDT","price":12'
    first = [garbage, huge, glued_halves, two_on_one_line, half_line]

    later = now + 10
    for i in range(20):
        valid.append(("BTCUSDT", 100.0 + i, later + i))
        valid.append(("ETHUSDT", 3000.0 - i, later + i))
    valid.append(("ETHUSDT", 3000.0 - 19, later + 19))  # a duplicate: it counts too
    second = [b'34.5,"timestamp":%d}\n' % now, b"".join(line(*t) for t in valid[3:])]
    rejects = {
        "bad_json": 2 + 2 + 1 + 1,  # garbage, NaN; two halves; two objects; the tail
        "price_not_finite": 1,  # 1e999: valid JSON, but beyond a double
        "price_not_number": 2,
        "price_not_positive": 3,
        "price_missing": 1,
        "unknown_symbol": 3,
        "timestamp_invalid": 2,
        "not_an_object": 1,
        "missing_field": 1,
        "line_too_long": 1,
        "truncated_line": 1,  # the connection closed inside a line
    }
    return first, second, valid, rejects


@dataclass
class HostileStack:
    feed: HostileFeed
    daemon: Daemon
    postgres: PostgresServer
    valid: list[Tick]
    rejects: dict[str, int]


@pytest.fixture
def hostile(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[HostileStack]:
    first, second, valid, rejects = hostile_script()
    feed = HostileFeed(first, second)
    feed.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    config["exchanges"] = [{"name": FEED, "host": "127.0.0.1", "port": feed.port}]
    daemon = Daemon(tmp_path, config)

    def progress() -> int:
        try:
            st = daemon.get("/health")[1]["exchanges"][FEED]
        except (OSError, KeyError):  # not answering yet
            return -1
        return int(st["ticks"]) + int(st["rejected"])

    feed.progress = progress
    daemon.start()
    try:
        yield HostileStack(feed, daemon, private_postgres, valid, rejects)
    finally:
        daemon.stop()
        feed.stop()


def metric(text: str, name: str, **labels: str) -> float | None:
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if got == labels:
            return float(m.group(2))
    return None


def test_hostile_feed_is_counted_per_reason_and_valid_ticks_after_it_are_stored(
    hostile: HostileStack,
) -> None:
    d = hostile.daemon
    assert_real_stack(d)
    assert hostile.feed.done.wait(60), "the daemon never came back for the second connection"
    assert not hostile.feed.errors
    want_ticks = len(hostile.valid)
    st = d.wait_for("/health", lambda s, b: b["exchanges"][FEED]["ticks"] >= want_ticks)
    feed = st["exchanges"][FEED]
    assert feed["ticks"] == want_ticks
    assert feed["rejected_by_reason"] == hostile.rejects
    assert feed["reconnects"] >= 1
    assert d.proc is not None
    assert d.proc.poll() is None

    status, text = _request(d, "GET", "/metrics")
    assert status == 200
    for reason, n in hostile.rejects.items():
        assert metric(text, "marketflow_rejected_total", source=FEED, reason=reason) == n
    assert metric(text, "marketflow_ticks_total", source=FEED) == want_ticks

    # Nothing glued: no price made of two half lines, none from a two-object line.
    for pair, prices in (("BTCUSDT", [100.0 + i for i in range(20)]), ("ETHUSDT", [3000.0])):
        _, hi = d.get(f"/prices/highest/{FEED}/{pair}?period=5m")
        assert hi["price"] == max(prices), hi
    _, latest = d.get(f"/prices/latest/{FEED}/BTCUSDT")
    assert latest["price"] == 119.0

    d.terminate()
    expected: dict[tuple[str, int], list[float]] = {}
    for symbol, price, ts in hostile.valid:
        expected.setdefault((symbol, ts // 60_000 * 60_000), []).append(price)
    rows = asyncio.run(minute_rows(hostile.postgres.dsn, FEED))
    got = {(r["pair_name"], r["minute_ms"]): r for r in rows}
    assert set(got) == set(expected)
    for key, prices in expected.items():
        r = got[key]
        assert (r["tick_count"], r["min_price"], r["max_price"]) == (
            len(prices),
            min(prices),
            max(prices),
        ), key
        assert r["average_price"] == pytest.approx(sum(prices) / len(prices), rel=1e-12)


def test_hostile_feed_rejects_are_logged_with_a_sample_per_reason(hostile: HostileStack) -> None:
    d = hostile.daemon
    assert hostile.feed.done.wait(60), "the daemon never came back for the second connection"
    d.wait_for("/health", lambda s, b: b["exchanges"][FEED]["ticks"] >= len(hostile.valid))
    samples = {  # a piece of the bad bytes each reason must show in the log
        "bad_json": "this is not json",
        "price_not_number": "100.5",
        "price_not_positive": "-5",
        "unknown_symbol": "XRPUSDT",
        "not_an_object": "[1,2,3]",
        "truncated_line": '"price":12',
    }
    lines = d.log().splitlines()
    for reason, piece in samples.items():
        logged = [ln for ln in lines if reason in ln and "sample" in ln]
        assert logged, f"no sample logged for {reason}"
        assert any(piece in ln for ln in logged), (reason, logged)


def _request(d: Daemon, method: str, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


BAD_GETS = [  # "/" is the dashboard (tests/e2e/test_dashboard_e2e.py)
    "/prices",
    "/prices/latest/",
    "/prices/latest//",
    "//prices//latest//BTCUSDT",
    "/prices/latest/hostile/BTCUSDT/extra",
    "/prices/latest/XRPUSDT",
    "/prices/latest/%00",
    "/prices/latest/%FF%FE%FD",
    "/prices/latest/%F0%9F%92%A9",
    "/prices/latest/%C3%84%C3%96%C3%9C",
    "/prices/latest/..%2F..%2Fetc%2Fpasswd",
    "/prices/latest/" + "A" * 4000,
    "/prices/latest/" + "%F0%9F%92%A9" * 300,
    f"/prices/latest/{'B' * 2000}/BTCUSDT",
    "/prices/latest/nowhere/BTCUSDT",
    "/prices/latest/test-exchange9/BTCUSDT",
    "/prices/highest/BTCUSDT%00",
    "/prices/highest/hostile/" + "C" * 3000 + "?period=1m",
    "/prices/average/hostile/BTCUSDT?period=",
    "/prices/average/hostile/BTCUSDT?period=0s",
    "/prices/average/hostile/BTCUSDT?period=-1s",
    "/prices/average/hostile/BTCUSDT?period=1.5s",
    "/prices/average/hostile/BTCUSDT?period=1S",
    "/prices/average/hostile/BTCUSDT?period=1d",
    "/prices/average/hostile/BTCUSDT?period=%201s",
    "/prices/average/hostile/BTCUSDT?period=5m%0A",  # data in 5m: only the newline is bad
    "/prices/average/hostile/BTCUSDT?period=5m%00",
    "/prices/average/hostile/BTCUSDT?period=%D9%A1s",  # an Arabic-Indic digit one
    "/prices/average/hostile/BTCUSDT?period=99999999h",
    "/prices/average/hostile/BTCUSDT?period=9999999h",
    "/prices/average/hostile/BTCUSDT?period=" + "9" * 5000 + "s",
    "/prices/average/hostile/BTCUSDT?period=%ZZ",
    "/prices/average/hostile/BTCUSDT?period=banana",
    "/prices/average/hostile/BTCUSDT?foo=bar",
    "/prices/average/hostile/BTCUSDT?period=1m&limit=5",
    "/prices/average/hostile/BTCUSDT?period=1m&period=banana",
    "/prices/lowest/BTCUSDT?%F0%9F%92%A9=1",
    "/prices/lowest/hostile/DOGEUSDT?period=1m",  # no data yet for this pair
    "/mode/test",
    "/mode/" + "x" * 3000,
    "/health/extra",
    "/api/messages?limit=0",
    "/api/messages?limit=abc",
    "/api/messages?limit=1001",
    "/api/messages?limit=%EF%BC%91",  # a full-width digit one
    "/api/messages?before_id=-1",
    "/api/messages?before_id=99999999999999999999999",
    "/api/messages?offset=-5",
    "/api/messages?since=yesterday",
    "/api/messages?since=0001-01-01T00:00:00%2B14:00",
    "/api/messages?since=9999-12-31T23:59:59-14:00",
    "/api/messages?since=2026-01-01T00:00:00",
    "/api/messages?msg_type=" + "D" * 100,
    "/api/messages?symbol=%00",
    "/api/messages?nope=1",
    "/api/messages/abc",
    "/api/messages/0",
    "/api/messages/-1",
    "/api/messages/99999999999999999999999",
    "/api/messages/123456789",
    "/api/messages/rejects?limit=x",
    "/api/messages/rejects?since=1",
]
BAD_METHODS = [
    ("POST", "/prices/latest/BTCUSDT"),
    ("POST", "/prices/highest/hostile/BTCUSDT?period=1m"),
    ("DELETE", "/prices/latest/BTCUSDT"),
    ("PUT", "/mode/test"),
    ("POST", "/mode/banana"),
    ("POST", "/mode/" + "%F0%9F%92%A9" * 50),
    ("POST", "/health"),
    ("POST", "/metrics"),
    ("PATCH", "/api/messages"),
    ("POST", "/api/messages/1"),
    ("GET", "/mode/live"),
]


def test_bad_api_input_answers_4xx_with_a_json_error_never_500(hostile: HostileStack) -> None:
    d = hostile.daemon
    assert_real_stack(d)
    d.wait_for(f"/prices/latest/{FEED}/BTCUSDT", lambda s, b: s == 200)
    failures = []
    for method, path in [("GET", p) for p in BAD_GETS] + BAD_METHODS:
        status, text = _request(d, method, path)
        try:
            body: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            body = None
        if not (400 <= status < 500 and isinstance(body, dict) and body.get("error")):
            failures.append((method, path[:80], status, text[:200]))
    assert not failures, "\n".join(map(str, failures))
    # The daemon still answers normally, and logged no handler failure.
    assert d.get("/mode") == (200, {"mode": "live"})
    assert d.get(f"/prices/latest/{FEED}/BTCUSDT")[0] == 200
    assert "Traceback" not in d.log()
    assert "Error handling request" not in d.log()
