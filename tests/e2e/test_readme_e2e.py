"""README promises, each against the daemon as users run it, on a feed whose every tick is known.

The feed is a socket server in this test ("scripted"): the test decides each line, so highest,
lowest, average, their timestamps, late ticks and the metrics are exact.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
import simplefix

from tests.e2e.conftest import daemon_config
from tests.e2e.procs import ROOT, Daemon, assert_real_stack, minute_rows, poll
from tests.e2e.scripted import ScriptedFeed, tick
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

FEED = "scripted"


@dataclass
class Scripted:
    feed: ScriptedFeed
    daemon: Daemon
    postgres: PostgresServer
    redis: RedisServer


@pytest.fixture
def scripted(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[Scripted]:
    feed = ScriptedFeed()
    feed.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    # No silence timeout: the feed speaks only when the test says so.
    config["pipeline"] = {**cast(dict[str, object], config["pipeline"]), "stale_after_s": 600.0}
    config["exchanges"] = [{"name": FEED, "host": "127.0.0.1", "port": feed.port}]
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        assert_real_stack(daemon)
        yield Scripted(feed, daemon, private_postgres, private_redis)
    finally:
        daemon.stop()
        feed.stop()


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def wait_ticks(d: Daemon, n: int) -> dict[str, object]:
    body: dict[str, object] = d.wait_for(
        "/health",
        lambda s, b: b["exchanges"][FEED]["ticks"] + b["exchanges"][FEED]["rejected"] >= n,
    )
    return body


async def insert_minutes(dsn: str, rows: list[tuple[str, int, float, float, float, int]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO minute_prices (pair_name, exchange, timestamp, average_price, "
            "min_price, max_price, tick_count) VALUES ($1, $2, to_timestamp($3 / 1000.0), "
            "$4, $5, $6, $7)",
            [(pair, FEED, ms, avg, lo, hi, n) for pair, ms, avg, lo, hi, n in rows],
        )
    finally:
        await conn.close()


BTC_TICKS_AGO = [(101.5, 3877), (105.25, 2544), (99.75, 1211), (102.0, 100)]  # price, ms ago
WINDOW_SUM, WINDOW_N = 101.5 + 105.25 + 99.75 + 102.0, 4


def play_ticks_and_stored_minutes(scripted: Scripted) -> tuple[int, int]:
    """Four BTCUSDT ticks of the last 4 s, and stored minutes older than the 10-minute window
    (30 and 50 minutes and 2 h ago); the time the ticks were stamped from and its minute."""
    now = time.time_ns() // 1_000_000
    scripted.feed.send(b"".join(tick("BTCUSDT", p, now - ago) for p, ago in BTC_TICKS_AGO))
    wait_ticks(scripted.daemon, len(BTC_TICKS_AGO))
    minute = now // 60_000 * 60_000
    stored = [
        ("BTCUSDT", minute - 30 * 60_000, 150.0, 120.0, 200.0, 4),
        ("BTCUSDT", minute - 50 * 60_000, 80.0, 50.0, 90.0, 2),
        ("BTCUSDT", minute - 120 * 60_000, 500.0, 10.0, 999.0, 10),
    ]
    asyncio.run(insert_minutes(scripted.postgres.dsn, stored))
    return now, minute


def ask(d: Daemon, stat: str, q: str) -> dict[str, Any]:
    status, body = d.get(f"/prices/{stat}/{FEED}/BTCUSDT{q}")
    assert status == 200, body
    return dict(body)


def second_of(ms: int) -> int:
    return ms // 1000 * 1000


def test_highest_lowest_average_exact_and_periods_longer_than_the_window_add_stored_minutes(
    scripted: Scripted,
) -> None:
    """README: within the window answers are exact to the second, highest/lowest carry the
    start of the second the price was seen in, average the answer's time; longer periods add
    whole stored minutes at their far end, and no period means all stored history."""
    d = scripted.daemon
    now, _ = play_ticks_and_stored_minutes(scripted)
    for q in ("?period=1m", "?period=5m"):
        hi = ask(d, "highest", q)
        # Only the minute the daemon started in can be incomplete here (closed, not covered).
        assert hi.pop("complete") is (hi.pop("incomplete_minutes") == 0)
        assert hi == {
            "symbol": "BTCUSDT", "exchange": FEED, "price": 105.25,
            "timestamp": iso(second_of(now - 2544)), "period": q.split("=")[1],
        }  # fmt: skip
        lo = ask(d, "lowest", q)
        assert (lo["price"], lo["timestamp"]) == (99.75, iso(second_of(now - 1211)))
        before = time.time_ns() // 1_000_000
        avg = ask(d, "average", q)
        after = time.time_ns() // 1_000_000
        assert (avg["price"], avg["count"]) == (pytest.approx(WINDOW_SUM / WINDOW_N), WINDOW_N)
        assert iso(before - 1) <= avg["timestamp"] <= iso(after + 1)
    # 1 h: the window plus the minutes 30 and 50 minutes ago (not the one 2 h ago).
    assert ask(d, "highest", "?period=1h")["price"] == 200.0
    assert ask(d, "lowest", "?period=1h")["price"] == 50.0
    avg = ask(d, "average", "?period=1h")
    total, n = WINDOW_SUM + 150.0 * 4 + 80.0 * 2, WINDOW_N + 6
    assert (avg["price"], avg["count"]) == (pytest.approx(total / n, rel=1e-12), n)
    # The inserted rows have no covered_ms (as rows of older versions): not known complete.
    assert avg["complete"] is False
    assert avg["incomplete_minutes"] >= 2
    # No period: all stored history.
    hi = ask(d, "highest", "")
    assert (hi["price"], hi["period"]) == (999.0, "all")
    assert ask(d, "lowest", "")["price"] == 10.0
    avg = ask(d, "average", "")
    total, n = total + 500.0 * 10, n + 10
    assert (avg["price"], avg["count"]) == (pytest.approx(total / n, rel=1e-12), n)
    # Across exchanges ("all"): the one exchange of the mode.
    _, across = d.get("/prices/highest/BTCUSDT?period=1m")
    assert (across["exchange"], across["price"]) == ("all", 105.25)


def test_highest_and_lowest_from_stored_minutes_carry_the_start_of_their_minute(
    scripted: Scripted,
) -> None:
    d = scripted.daemon
    _, minute = play_ticks_and_stored_minutes(scripted)
    assert ask(d, "highest", "?period=1h")["timestamp"] == iso(minute - 30 * 60_000)
    assert ask(d, "lowest", "?period=1h")["timestamp"] == iso(minute - 50 * 60_000)
    assert ask(d, "highest", "")["timestamp"] == iso(minute - 120 * 60_000)
    assert ask(d, "lowest", "")["timestamp"] == iso(minute - 120 * 60_000)


def metric_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of a Prometheus text page."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for m in re.finditer(r"^([a-z_]+)(?:\{([^}]*)\})? (\S+)$", text, re.MULTILINE):
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def get_text(d: Daemon, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.port}{path}", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def redis_window_keys(url: str, symbol: str) -> list[Any]:
    async def keys() -> list[Any]:
        client = aioredis.Redis.from_url(url)
        try:
            return list(await client.keys(f"marketflow:window:{FEED}:{symbol}:*"))
        finally:
            await client.aclose()

    return asyncio.run(keys())


def test_late_tick_is_counted_in_health_and_metrics_and_every_metric_family_is_served(
    scripted: Scripted,
) -> None:
    d = scripted.daemon
    now = time.time_ns() // 1_000_000
    scripted.feed.send(tick("ETHUSDT", 3000.0, now - 500) + tick("ETHUSDT", 3001.0, now - 400))
    scripted.feed.send(b"{not json}\n")
    wait_ticks(d, 3)
    # Once a flush has written these seconds to Redis it has also moved the window's floor
    # to "10 minutes before the newest tick": a tick 15 minutes old is late now, and dropped.
    poll(lambda: redis_window_keys(scripted.redis.url, "ETHUSDT"), bool, 20, "window in Redis")
    scripted.feed.send(tick("ETHUSDT", 9999.0, now - 15 * 60_000))
    health = wait_ticks(d, 4)
    assert health["late_ticks"] == 1
    _, hi = d.get(f"/prices/highest/{FEED}/ETHUSDT")
    assert hi["price"] == 3001.0  # the late tick is in no answer

    got = metric_values(get_text(d, "/metrics"))
    src = frozenset({("source", FEED)})

    def value(name: str, labels: frozenset[tuple[str, str]] = frozenset()) -> float:
        assert (name, labels) in got, (name, labels, sorted(k for k, _ in got))
        return got[(name, labels)]

    assert value("marketflow_ticks_total", src) == 3  # valid lines, the late one included
    assert value("marketflow_rejected_total", src | {("reason", "bad_json")}) == 1
    assert value("marketflow_reconnects_total", src) == 0
    assert value("marketflow_source_connected", src) == 1
    assert 0 <= value("marketflow_last_tick_age_seconds", src) < 600
    assert value("marketflow_receipt_lag_seconds", src) > -60
    assert value("marketflow_queue_depth", frozenset({("queue", "fanin")})) == 0
    assert value("marketflow_queue_depth", frozenset({("queue", FEED)})) == 0
    assert value("marketflow_late_ticks_total") == 1
    assert value("marketflow_storage_up") == 1
    assert value("marketflow_storage_pending_rows") == 0
    assert value("marketflow_cache_up") == 1
    for name in ("accepted", "rejected", "filtered", "stored", "bytes"):
        assert value(f"marketflow_capture_{name}_total") == 0


def test_test_mode_rows_are_stored_only_under_test_exchange_names(scripted: Scripted) -> None:
    d = scripted.daemon
    now = time.time_ns() // 1_000_000
    live = [(201.5, now - 900), (203.5, now - 600), (202.0, now - 300)]
    scripted.feed.send(b"".join(tick("SOLUSDT", p, ts) for p, ts in live))
    wait_ticks(d, len(live))
    assert d.request("POST", "/mode/test") == (200, {"mode": "test"})
    d.wait_for("/prices/latest/BTCUSDT", lambda s, b: s == 200 and "test-" in b["source"])
    for n in (1, 2, 3):
        d.wait_for(f"/prices/latest/test-exchange{n}/SOLUSDT", lambda s, b: s == 200)
    d.terminate()  # the partial minutes are written at shutdown

    rows = asyncio.run(minute_rows(scripted.postgres.dsn))
    names = {r["exchange"] for r in rows}
    assert names == {FEED, "test-exchange1", "test-exchange2", "test-exchange3"}, names
    ours = [r for r in rows if r["exchange"] == FEED]
    by_minute: dict[int, list[float]] = {}
    for p, ts in live:
        by_minute.setdefault(ts // 60_000 * 60_000, []).append(p)
    # Under the live name: exactly the live ticks, nothing the generator made.
    assert {(r["pair_name"], r["minute_ms"], r["tick_count"], r["min_price"], r["max_price"])
            for r in ours} == {("SOLUSDT", m, len(ps), min(ps), max(ps))
                               for m, ps in by_minute.items()}  # fmt: skip


def fix_message(begin: str, msg_type: str, seq: int, fields: list[tuple[int, str]]) -> bytes:
    """Built by simplefix (a third-party encoder): its BodyLength and CheckSum are the oracle."""
    m = simplefix.FixMessage()
    m.append_pair(8, begin, header=True)
    m.append_pair(35, msg_type, header=True)
    m.append_pair(49, "CLIENT", header=True)
    m.append_pair(56, "MARKETFLOW", header=True)
    m.append_pair(34, seq, header=True)
    m.append_pair(52, "20261126-12:00:00.000", header=True)
    for tag, value in fields:
        m.append_pair(tag, value)
    return bytes(m.encode())


def send_tcp(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)


def test_capture_stores_fix_40_41_44_and_50sp2_end_to_end(scripted: Scripted) -> None:
    d = scripted.daemon
    port = d.get("/health")[1]["capture"]["listener"]["port"]
    order40 = [(11, "A1"), (21, "1"), (55, "AAPL"), (54, "1"), (38, "100"), (40, "1")]
    report41 = [(37, "O1"), (17, "E1"), (150, "0"), (39, "0"), (55, "MSFT"), (54, "2")]
    request44 = [(262, "R1"), (263, "1"), (264, "1"), (146, "1"), (55, "IBM")]
    order50sp2 = [(1128, "9"), (11, "A4"), (55, "TSLA"), (54, "1"), (40, "2")]
    frames = [
        fix_message("FIX.4.0", "D", 1, order40),
        fix_message("FIX.4.1", "8", 2, report41),
        fix_message("FIX.4.4", "V", 3, request44),
        fix_message("FIXT.1.1", "D", 4, order50sp2),  # FIX 5.0SP2 over FIXT: ApplVerID 9
    ]
    send_tcp(port, b"".join(frames))

    body = d.wait_for("/api/messages?limit=10", lambda s, b: s == 200 and len(b["messages"]) == 4)
    got = sorted(
        (m["seq_num"], m["begin_string"], m["msg_type"], m["msg_type_name"], m["symbol"])
        for m in body["messages"]
    )
    assert got == [
        (1, "FIX.4.0", "D", "NewOrderSingle", "AAPL"),
        (2, "FIX.4.1", "8", "ExecutionReport", "MSFT"),
        (3, "FIX.4.4", "V", "MarketDataRequest", "IBM"),
        (4, "FIXT.1.1", "D", "NewOrderSingle", "TSLA"),
    ]
    detail = d.get(f"/api/messages/{body['messages'][0]['id']}")[1]  # newest: the 5.0SP2 one
    assert {"tag": 1128, "name": "ApplVerID", "value": "9", "meaning": "FIX50SP2"} in detail[
        "enriched"
    ]
    assert d.get("/api/messages/rejects")[1]["rejects"] == []
    health = d.get("/health")[1]["capture"]
    assert (health["accepted"], health["store"]) == (4, "postgres")


NC_SHIM = """
import contextlib, socket, sys
# What `nc -q1 HOST PORT` does here: stdin to the socket, wait a second for EOF, close.
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(sys.stdin.buffer.read())
s.shutdown(socket.SHUT_WR)
s.settimeout(1)
with contextlib.suppress(OSError):
    s.recv(1)
s.close()
"""


def test_readme_capture_example_runs_as_written(scripted: Scripted) -> None:
    d = scripted.daemon
    port = d.get("/health")[1]["capture"]["listener"]["port"]
    readme = (ROOT / "README.md").read_text()
    [command] = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("printf '8=FIX")]
    printf, sep, nc = command.partition(" | ")
    assert sep, command
    assert nc == "nc -q1 127.0.0.1 9876", command
    sink = (
        "nc -q1 127.0.0.1"
        if shutil.which("nc")
        else f"{sys.executable} -c {shlex.quote(NC_SHIM)} 127.0.0.1"
    )
    subprocess.run(["bash", "-c", f"{printf} | {sink} {port}"], check=True, timeout=30)

    body = d.wait_for(
        "/api/messages?limit=10&msg_type=D", lambda s, b: s == 200 and len(b["messages"]) == 1
    )
    [msg] = body["messages"]
    assert (msg["begin_string"], msg["msg_type"], msg["sender"], msg["target"]) == (
        "FIX.4.2", "D", "CLIENT", "MF",
    )  # fmt: skip
    assert (msg["seq_num"], msg["symbol"]) == (1, "AAPL")
    assert d.get("/api/messages/rejects")[1]["rejects"] == []  # BodyLength, CheckSum right


def redis_contents(url: str) -> tuple[dict[str, tuple[float, int]], dict[str, dict[str, str]]]:
    """What Redis holds: {field: (price, timestamp)} of the latest hash, and every window hash."""

    async def read() -> tuple[dict[str, tuple[float, int]], dict[str, dict[str, str]]]:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            raw = cast(dict[str, str], await client.hgetall("marketflow:latest"))
            latest: dict[str, tuple[float, int]] = {}
            for k, v in raw.items():
                doc = orjson.loads(v)
                latest[k] = (doc["price"], doc["timestamp"])
            windows = {
                str(key): cast(dict[str, str], await client.hgetall(key))
                async for key in client.scan_iter(match="marketflow:window:*")
            }
            return latest, windows
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_redis_that_returns_empty_is_refilled_with_every_latest_price_and_second_held(
    scripted: Scripted,
) -> None:
    """README: when Redis returns it is refilled with every latest price and second held. The
    harness's Redis keeps nothing across a restart, so all of it must come from the daemon:
    the seconds written before the outage and those that arrived while it was down."""
    d = scripted.daemon
    now = time.time_ns() // 1_000_000 // 1000 * 1000
    before = [
        *[(s, 101.0 + k + 0.25 * j, now - (100 - k) * 1000 + 100 * j)
          for s in ("BTCUSDT",) for k in range(6) for j in range(2)],
        ("ETHUSDT", 3001.5, now - 70_000 + 5),
    ]  # fmt: skip
    during = [
        *[("BTCUSDT", 99.0 - k, now - (50 - k) * 1000 + 7) for k in range(3)],
        ("SOLUSDT", 201.25, now - 30_000 + 400),
        ("BTCUSDT", 102.75, now - 1000 + 900),
    ]
    scripted.feed.send(b"".join(tick(*t) for t in before))
    wait_ticks(d, len(before))
    poll(
        lambda: redis_contents(scripted.redis.url)[1],
        lambda w: sum(len(f) for f in w.values()) == 7,  # 6 BTCUSDT seconds, 1 ETHUSDT
        20,
        "the seconds before the outage in Redis",
    )
    scripted.redis.stop()
    scripted.feed.send(b"".join(tick(*t) for t in during))
    wait_ticks(d, len(before) + len(during))
    # The flush of these ticks finds Redis gone (an idle daemon writes nothing, notices nothing).
    d.wait_for("/health", lambda s, b: b["redis"]["state"] == "down")
    scripted.redis.start()
    d.wait_for("/health", lambda s, b: b["redis"]["state"] == "up" and b["status"] == "ok")

    sent = before + during
    want_latest = {}
    for sym in {s for s, _, _ in sent}:
        _, price, ts = max((t for t in sent if t[0] == sym), key=lambda t: t[2])
        want_latest[f"{FEED}:{sym}"] = (price, ts)
    want_windows: dict[str, dict[int, list[float]]] = {}
    for sym, price, ts in sent:
        sec = ts // 1000
        key = f"marketflow:window:{FEED}:{sym}:{sec // 60 * 60}"
        b = want_windows.setdefault(key, {}).setdefault(sec, [price, price, 0.0, 0])
        b[0], b[1], b[2], b[3] = min(b[0], price), max(b[1], price), b[2] + price, b[3] + 1

    def as_numbers(windows: dict[str, dict[str, str]]) -> dict[str, dict[int, list[float]]]:
        return {
            key: {int(sec): [float(x) for x in v.split(",")] for sec, v in fields.items()}
            for key, fields in windows.items()
        }

    latest, windows = poll(
        lambda: redis_contents(scripted.redis.url),
        lambda got: got[0] == want_latest and as_numbers(got[1]) == want_windows,
        30,
        "Redis refilled with every latest price and every second held",
    )
    assert len(latest) == 3
    assert sum(len(f) for f in windows.values()) == 6 + 1 + 3 + 1 + 1
