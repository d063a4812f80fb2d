"""The daemon holding a FIX 4.4 session with the FIX venue simulator process (issue 3).

The venue's ``--trade-log`` lists every trade it delivered: the oracle. Everything the daemon
derives from the session (tick count, exact per-second period answers, minute rows in
PostgreSQL) must match that log exactly, across a venue restart and forced sequence gaps.
"""

from __future__ import annotations

import asyncio
import math
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import PAIRS, daemon_config
from tests.e2e.procs import Daemon, Simulator, minute_rows
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

VENUE = "fixvenue"
Trade = tuple[str, float, int]  # symbol, price, epoch ms


@dataclass
class Agg:
    count: int = 0
    low: float = math.inf
    high: float = -math.inf
    total: float = 0.0

    def add(self, price: float) -> None:
        self.count += 1
        self.low = min(self.low, price)
        self.high = max(self.high, price)
        self.total += price

    @property
    def mean(self) -> float:
        return self.total / self.count


def aggregate(trades: Iterable[Trade], key: Any) -> dict[Any, Agg]:
    out: dict[Any, Agg] = {}
    for t in trades:
        out.setdefault(key(t), Agg()).add(t[1])
    return out


def read_trade_log(path: Path) -> list[Trade]:
    trades = []
    for line in path.read_bytes().splitlines():
        d = orjson.loads(line)
        trades.append((d["symbol"], d["price"], d["timestamp"]))
    return trades


def fix_message(begin: str, fields: list[tuple[int, str]]) -> bytes:
    """What a user builds with printf: BodyLength and CheckSum computed by hand."""
    body = "".join(f"{tag}={value}\x01" for tag, value in fields).encode()
    head = f"8={begin}\x019={len(body)}\x01".encode()
    return head + body + f"10={sum(head + body) % 256:03d}\x01".encode()


@dataclass
class FixStack:
    venue: Simulator
    trade_log: Path
    daemon: Daemon
    postgres: PostgresServer


@pytest.fixture
def fix_stack(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[FixStack]:
    trade_log = tmp_path / "trades.jsonl"
    venue = Simulator(
        tmp_path, VENUE, "fix", "--trade-log", str(trade_log), "--gap-every", "150",
        "--seed", "7",
    )  # fmt: skip
    venue.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    config["exchanges"] = [
        {
            "name": VENUE,
            "host": "127.0.0.1",
            "port": venue.port,
            "protocol": "fix",
            "sender_comp_id": "MARKETFLOW",
            "target_comp_id": "VENUE",
            "heartbeat_s": 2,
        }
    ]
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        yield FixStack(venue, trade_log, daemon, private_postgres)
    finally:
        daemon.stop()
        venue.stop()


def venue_status(d: Daemon) -> dict[str, Any]:
    _, health = d.get("/health")
    status: dict[str, Any] = health["exchanges"][VENUE]
    return status


def get_at_second(d: Daemon, path: str, start_s: int) -> tuple[int, Any]:
    """``path?period=`` whose window starts exactly at second ``start_s`` (same host clock)."""
    for _ in range(10):
        before = time.time()
        # A period of N s covers the current second and the N - 1 before it.
        status, body = d.get(f"{path}?period={int(before) - start_s + 1}s")
        if int(time.time()) == int(before):  # the daemon read the clock in the same second
            return status, body
    raise AssertionError("the clock kept crossing second boundaries")


@pytest.mark.timeout(180)
def test_fix_session_survives_venue_restart_and_gaps_and_aggregates_match_trade_log(
    fix_stack: FixStack,
) -> None:
    d, venue = fix_stack.daemon, fix_stack.venue
    d.wait_for(f"/prices/latest/{VENUE}/BTCUSDT", lambda s, b: s == 200 and b["price"] > 0)
    # --gap-every 150: the daemon sees MsgSeqNum gaps and recovers them by ResendRequest.
    d.wait_for("/health", lambda s, b: b["exchanges"][VENUE]["ticks"] >= 120, timeout=30)

    venue.stop()
    d.wait_for("/health", lambda s, b: not b["exchanges"][VENUE]["connected"])
    down_ms = time.time() * 1000
    venue.start()
    d.wait_for(
        "/health",
        lambda s, b: (
            b["exchanges"][VENUE]["connected"] and b["exchanges"][VENUE]["reconnects"] >= 1
        ),
    )
    for pair in PAIRS:  # prices flow again, from the new session
        d.wait_for(
            f"/prices/latest/{VENUE}/{pair}",
            lambda s, b: s == 200 and _ms(b["timestamp"]) > down_ms,
        )
    ticks_before = venue_status(d)["ticks"]
    d.wait_for(  # enough for another gap (one in 150 messages) in the new session
        "/health", lambda s, b: b["exchanges"][VENUE]["ticks"] >= ticks_before + 120, timeout=30
    )
    time.sleep(1.0)
    venue.stop()  # freeze the oracle: no trade after this

    trades = read_trade_log(fix_stack.trade_log)
    for pair in PAIRS:  # trades of every pair from both venue runs
        assert any(s == pair and ts < down_ms for s, _, ts in trades), pair
        assert any(s == pair and ts > down_ms for s, _, ts in trades), pair
    # Every delivered trade is exactly one tick; snapshot trades (re-subscribes) are not.
    status = d.wait_for(
        "/health", lambda s, b: b["exchanges"][VENUE]["ticks"] >= len(trades), timeout=10
    )["exchanges"][VENUE]
    assert status["ticks"] == len(trades)
    # No seq_gap: every gap was resent. The restarted venue process numbers from 1 again,
    # which the session follows and counts.
    assert set(status["rejected_by_reason"]) == {"logon_seq_lower"}, status["rejected_by_reason"]

    # Period answers are exact to the second: compare them with the log from several starts.
    first_s = min(ts for _, _, ts in trades) // 1000
    last_s = max(ts for _, _, ts in trades) // 1000
    starts = sorted({first_s - 2, *range(first_s, last_s + 1, max(1, (last_s - first_s) // 5))})
    sleep_until = last_s + 1.01  # every start is then a whole second in the past: period >= 1s
    time.sleep(max(0.0, sleep_until - time.time()))
    for start_s in starts:
        expected = aggregate((t for t in trades if t[2] // 1000 >= start_s), lambda t: t[0])
        for pair in PAIRS:
            want = expected.get(pair)
            if want is None:  # no trade of this pair in the period
                assert get_at_second(d, f"/prices/average/{VENUE}/{pair}", start_s)[0] == 404
                continue
            _, hi = get_at_second(d, f"/prices/highest/{VENUE}/{pair}", start_s)
            _, lo = get_at_second(d, f"/prices/lowest/{VENUE}/{pair}", start_s)
            _, avg = get_at_second(d, f"/prices/average/{VENUE}/{pair}", start_s)
            assert hi["price"] == want.high, (start_s, pair, hi)
            assert lo["price"] == want.low, (start_s, pair, lo)
            assert avg["count"] == want.count, (start_s, pair, avg)
            assert math.isclose(avg["price"], want.mean, rel_tol=1e-12), (start_s, pair, avg)
            # highest/lowest carry the start of the second the price was seen in
            hi_seconds = {ts // 1000 for s, p, ts in trades if s == pair and p == want.high}
            assert _ms(hi["timestamp"]) // 1000 in hi_seconds

    # Shutdown writes the partial minute: every minute row equals the log's minute.
    d.terminate()
    rows = asyncio.run(minute_rows(fix_stack.postgres.dsn, VENUE))
    expected_minutes = aggregate(trades, lambda t: (t[0], t[2] // 60_000 * 60_000))
    got = {(r["pair_name"], r["minute_ms"]): r for r in rows}
    assert set(got) == set(expected_minutes)
    for key, want in expected_minutes.items():
        r = got[key]
        assert r["tick_count"] == want.count, (key, dict(r))
        assert r["min_price"] == want.low, (key, dict(r))
        assert r["max_price"] == want.high, (key, dict(r))
        assert math.isclose(r["average_price"], want.mean, rel_tol=1e-12), (key, dict(r))


def test_raw_fix_message_on_capture_port_is_listed_within_a_second(fix_stack: FixStack) -> None:
    d = fix_stack.daemon
    _, health = d.get("/health")
    port = health["capture"]["listener"]["port"]
    order_id = f"E2E-{time.time_ns()}"
    msg = fix_message(
        "FIX.4.2",
        [(35, "D"), (49, "CLIENT1"), (56, "BROKER"), (34, "7"), (52, "20260101-12:00:00.000"),
         (11, order_id), (55, "AAPL"), (54, "1"), (38, "100"), (40, "1")],
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(msg[:20])  # one message split over two packets, as TCP may deliver it
        time.sleep(0.05)
        s.sendall(msg[20:])
        sent = time.monotonic()
        found: list[dict[str, Any]] = []
        while time.monotonic() - sent < 1.0 and not found:
            _, body = d.get("/api/messages?msg_type=D&symbol=AAPL&limit=10")
            found = [m for m in body["messages"] if order_id in m["raw"]]
            if not found:
                time.sleep(0.05)
    assert found, f"not listed within a second: {d.get('/api/messages?limit=5')}"
    m = found[0]
    assert m["msg_type"] == "D"
    assert m["msg_type_name"] == "NewOrderSingle"
    assert (m["sender"], m["target"], m["seq_num"]) == ("CLIENT1", "BROKER", 7)
    status, detail = d.get(f"/api/messages/{m['id']}")
    assert status == 200
    side = next(f for f in detail["enriched"] if f["tag"] == 54)
    assert side["meaning"] == "Buy"  # enriched with the enum's meaning


def _ms(rfc3339: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


@pytest.mark.timeout(180)
def test_daemon_sigkilled_mid_session_resends_exactly_what_was_not_durable(
    fix_stack: FixStack,
) -> None:
    """Promise 5: the next expected MsgSeqNum is durable with the ticks it covers, so after a
    SIGKILL the restarted daemon asks the venue to resend exactly what was lost in memory:
    every trade of the log is counted once, none lost in the kill, none doubled by the resend.
    """
    d, venue = fix_stack.daemon, fix_stack.venue
    d.wait_for(f"/prices/latest/{VENUE}/BTCUSDT", lambda s, b: s == 200 and b["price"] > 0)
    for kill in range(2):
        d.wait_for("/health", lambda s, b: venue_status(d)["ticks"] > 100)
        time.sleep(0.5 + kill)
        assert d.stop(signal.SIGKILL) != 0
        time.sleep(1.0)  # the venue keeps trading while the daemon is down
        d.start()
        d.wait_for("/health", lambda s, b: b["exchanges"][VENUE]["connected"], timeout=20)
        assert d.get("/health")[1]["postgres"]["kind"] == "postgres"
        assert d.get("/health")[1]["redis"]["kind"] == "redis"
    d.wait_for("/health", lambda s, b: venue_status(d)["ticks"] > 100)
    venue.stop()  # freeze the oracle
    trades = read_trade_log(fix_stack.trade_log)
    d.terminate()  # writes the partial minute
    rows = asyncio.run(minute_rows(fix_stack.postgres.dsn, VENUE))
    expected = aggregate(trades, lambda t: (t[0], t[2] // 60_000 * 60_000))
    got = {(r["pair_name"], r["minute_ms"]): r for r in rows}
    assert sum(r["tick_count"] for r in rows) == len(trades)
    assert set(got) == set(expected)
    for key, want in expected.items():
        r = got[key]
        assert r["tick_count"] == want.count, (key, dict(r))
        assert (r["min_price"], r["max_price"]) == (want.low, want.high), (key, dict(r))
        assert math.isclose(r["average_price"], want.mean, rel_tol=1e-12), (key, dict(r))
