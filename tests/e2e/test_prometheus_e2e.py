"""A real Prometheus (Debian's ``prometheus`` binary) scrapes a live daemon every second.

Through Prometheus's HTTP API: every metric family README "Monitoring" documents is present;
every counter and histogram moves while traffic (and, for the counters of rare events, the
event) flows; every Grafana panel's query (deploy/grafana/dashboards/marketflow.json, with its
variables substituted as Grafana does for "All") returns data; and deploy/prometheus/alerts.yml
evaluates without error against the daemon's real series.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from tests.deploy.monitoring import ALERTS, PanelQuery, documented_families, panel_queries
from tests.e2e.conftest import PAIRS, daemon_config
from tests.e2e.procs import Daemon, Proc, Simulator, poll
from tests.e2e.scripted import ScriptedFeed, tick, wall_ms
from tests.harness.services import PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.e2e

# Panel queries of features on other branches, not merged yet (none now). Their queries must
# be valid and may return nothing here. The lead removes each entry when the branch that
# exports it is merged (then its panel must have data).
AWAITING_FEATURES: frozenset[str] = frozenset()

SCRIPTED = "scripted"
FIXVENUE = "fixvenue"
TOKEN = "prometheus-e2e-token"  # noqa: S105 - a test value, no secret


def awaiting(expr: str) -> bool:
    return any(name in expr for name in AWAITING_FEATURES)


class Prometheus(Proc):
    """``prometheus`` with a temporary config and TSDB, on a free loopback port."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: run `make server-binaries` (apt-get prometheus)")
        self.port = free_port()
        home = tmp / "prometheus"
        home.mkdir()
        shutil.copy(ALERTS, home / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "marketflow", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }  # fmt: skip
        (home / "prometheus.yml").write_text(yaml.safe_dump(config))
        super().__init__(
            [binary, f"--config.file={home / 'prometheus.yml'}",
             f"--storage.tsdb.path={home / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            tmp / "prometheus.log",
        )  # fmt: skip

    def start(self) -> None:
        super().start()

        def ready() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/-/ready", timeout=2
                ) as resp:
                    return bool(resp.status == 200)
            except (urllib.error.URLError, ConnectionError):
                return False

        poll(ready, bool, 30, f"prometheus ready on {self.port}")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400: a bad query; say which and why
            body = json.loads(exc.read())
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.api("query", query=expr)["result"])

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan


@dataclass
class PromStack:
    daemon: Daemon
    prometheus: Prometheus
    feed: ScriptedFeed
    capture_port: int


@pytest.fixture
def prom_stack(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[PromStack]:
    json_venue = Simulator(tmp_path, "exchange1")
    fix_venue = Simulator(tmp_path, FIXVENUE, "fix")
    feed = ScriptedFeed()
    procs: list[Proc] = [json_venue, fix_venue]
    for p in procs:
        p.start()
    feed.start()
    config = daemon_config(tmp_path, [json_venue], private_postgres, private_redis)
    pipeline = cast(dict[str, object], config["pipeline"])
    # The scripted feed is quiet (no stale reconnects); Python's own gen-0 GC threshold, so
    # that collections (marketflow_gc_*) happen at this test's modest tick rate.
    config["pipeline"] = {**pipeline, "stale_after_s": 600.0, "gc_gen0_threshold": 700}
    config["http"] = {**cast(dict[str, object], config["http"]), "control_token": TOKEN}
    # Small stream caps, so that the stream families' rare events happen (StreamClients).
    config["stream"] = {"max_connections": STREAM_MAX_CONNECTIONS,
                        "max_subscriptions": STREAM_MAX_SUBSCRIPTIONS,
                        "max_buffered_bytes": 32768}  # fmt: skip
    capture = cast(dict[str, Any], config["capture"])
    config["exchanges"] = [
        *cast(list[dict[str, object]], config["exchanges"]),
        {"name": FIXVENUE, "host": "127.0.0.1", "port": fix_venue.port, "protocol": "fix",
         "sender_comp_id": "MARKETFLOW", "target_comp_id": "VENUE", "heartbeat_s": 2},
        {"name": SCRIPTED, "host": "127.0.0.1", "port": feed.port},
    ]  # fmt: skip
    daemon = Daemon(tmp_path, config)
    # Heartbeats (35=0) are dropped by a capture filter: marketflow_capture_filtered moves.
    daemon.config_path.write_text(
        daemon.config_path.read_text()
        + '[[capture.filters]]\ntag = 35\nvalues = ["0"]\naction = "exclude"\n'
    )
    daemon.start()
    procs.append(daemon)
    prometheus = Prometheus(tmp_path, daemon.port)
    prometheus.start()
    procs.append(prometheus)
    try:
        yield PromStack(daemon, prometheus, feed, capture["port"])
    finally:
        for p in reversed(procs):
            p.stop()
        feed.stop()


def fix_message(msg_type: str, seq: int, *, checksum_delta: int = 0) -> bytes:
    fields = [(35, msg_type), (49, "CLIENT"), (56, "MARKETFLOW"), (34, str(seq)),
              (52, "20261202-08:00:00.000")]  # fmt: skip
    if msg_type == "D":
        fields += [(11, f"ord{seq}"), (55, "BTCUSDT"), (54, "1"), (38, "1"), (40, "1")]
    body = "".join(f"{tag}={value}\x01" for tag, value in fields).encode()
    head = f"8=FIX.4.4\x019={len(body)}\x01".encode()
    checksum = (sum(head + body) + checksum_delta) % 256
    return head + body + f"10={checksum:03d}\x01".encode()


STREAM_MAX_CONNECTIONS = 3
STREAM_MAX_SUBSCRIPTIONS = 8
SLOW_CLIENT_S = 8.0  # a client that never reads is replaced by a new one after this long


class StreamClients:
    """Stream clients on raw sockets (SSE): one that reads its snapshot and leaves (frames
    sent), one that never reads (conflated, then closed 1008), and the requests refused past
    the subscription and connection caps."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.slow: list[tuple[float, socket.socket]] = []

    def request(self, query: str, rcvbuf: int = 0) -> socket.socket:
        s = socket.socket()
        if rcvbuf:  # before connect: the window the client offers stays this small
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect(("127.0.0.1", self.port))
        s.sendall(f"GET /stream/sse?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return s

    @staticmethod
    def read_until(s: socket.socket, marker: bytes) -> bytes:
        got = b""
        while marker not in got:
            chunk = s.recv(65536)
            assert chunk, f"closed before {marker!r}: {got[:300]!r}"
            got += chunk
        return got

    def status(self, s: socket.socket) -> int:
        return int(self.read_until(s, b"\r\n").split(b" ", 2)[1])

    def answer(self, query: str) -> int:
        with self.request(query) as s:
            return self.status(s)

    def read_snapshot(self) -> bool:
        with self.request("channels=ticks,status") as reader:
            if self.status(reader) != 200:
                return False
            self.read_until(reader, b"event: ticks")  # subscribed, then the snapshots
            return True

    def poke(self) -> None:
        # (503 while the daemon has not yet seen that the last poke's clients went away)
        poll(self.read_snapshot, bool, 10, "a stream client reads its snapshot")
        assert 2 * len(PAIRS) > STREAM_MAX_SUBSCRIPTIONS
        poll(lambda: self.answer(f"channels=ticks,bbo&symbols={','.join(PAIRS)}"),
             lambda status: status == 400, 10, "a subscription over the cap refused")  # fmt: skip
        now = time.monotonic()
        if not self.slow or now - self.slow[-1][0] > SLOW_CLIENT_S:
            for _, old in self.slow:
                old.close()
            # Small frames only (no book snapshots): it falls behind, is conflated for several
            # rounds, and only then passes the bound (a big first frame would pass it at once).
            slow = self.request("channels=ticks,bbo", rcvbuf=1024)
            self.slow = [(now, slow)] if self.status(slow) == 200 else []
        held: list[socket.socket] = []
        try:  # the slow client holds one connection (or has been closed): one more is refused
            for _ in range(STREAM_MAX_CONNECTIONS + 1):
                held.append(self.request("channels=ticks"))  # a closed one is seen at once
                if self.status(held[-1]) == 503:
                    break
            else:
                raise AssertionError("no stream connection was refused")
        finally:
            for c in held:
                c.close()

    def close(self) -> None:
        for _, s in self.slow:
            s.close()


class Events:
    """Makes the rare events happen, again on every call, so their counters move."""

    def __init__(self, stack: PromStack) -> None:
        self.stack = stack
        self.seq = 0
        self.reconnects_asked = 0
        self.stream = StreamClients(stack.daemon.port)

    def poke(self) -> None:
        s, now = self.stack, wall_ms()
        s.feed.send(
            tick("ETHUSDT", 3000.0, now - 200)  # a fresh tick: the window's floor moves up
            + tick("ETHUSDT", 2990.0, now - 90_000)  # a closed minute: a row is (re)written
            + tick("ETHUSDT", 9999.0, now - 15 * 60_000)  # older than the window: late
            + b"{not json}\n"  # rejected
        )
        self.seq += 1
        with socket.create_connection(("127.0.0.1", s.capture_port), timeout=5) as c:
            c.sendall(fix_message("D", self.seq) + fix_message("0", self.seq + 1)
                      + fix_message("D", self.seq + 2, checksum_delta=1))  # fmt: skip
        self.seq += 3
        status, _ = s.daemon.request("POST", "/mode/live")  # no bearer token: 401, counted
        assert status == 401
        self.stream.poke()

    def reconnect(self) -> None:
        """Close the scripted feed's connection: the daemon reconnects."""
        if self.stack.feed.conns:
            self.stack.feed.conns[-1].close()
            self.reconnects_asked += 1


def moving_expr(family: str, kind: str) -> str:
    return f"sum({family}_count)" if kind == "histogram" else f"sum({family})"


def wait_target_up(prometheus: Prometheus, daemon: Daemon) -> None:
    def health() -> list[str]:
        targets = prometheus.api("targets")["activeTargets"]
        return [t["health"] for t in targets]

    try:
        poll(health, lambda h: h == ["up"], 30, "Prometheus scrapes the daemon")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{prometheus.log()[-2000:]}\n{daemon.log()[-2000:]}") from exc


def panel_has_data(prometheus: Prometheus, q: PanelQuery) -> bool:
    values = [float(r["value"][1]) for r in prometheus.query(q.expr)]
    return any(not math.isnan(v) for v in values)


@pytest.mark.timeout(120)
def test_prometheus_scrapes_every_documented_family_moving_and_every_panel_has_data(
    prom_stack: PromStack,
) -> None:
    d, prom = prom_stack.daemon, prom_stack.prometheus
    events = Events(prom_stack)
    try:
        _scrapes_every_family_moving_and_every_panel_has_data(d, prom, events)
    finally:
        events.stream.close()


def _scrapes_every_family_moving_and_every_panel_has_data(
    d: Daemon, prom: Prometheus, events: Events
) -> None:
    wait_target_up(prom, d)
    families = documented_families()
    assert families, "README 'Monitoring' has no metric table"

    # Present: each family has at least one series in Prometheus. (Event counters with a label
    # get their first series with their first event.)
    events.poke()
    poll(lambda: sorted(f for f, kind in families.items()
                        if not prom.query(f"count({moving_expr(f, kind)})")),
         lambda missing: missing == [], 20, "every documented family in Prometheus")  # fmt: skip

    # And the other way round: every family the daemon exports is documented.
    exported = {
        re.sub(r"_(bucket|count|sum)$", "", r["metric"]["__name__"])
        for r in prom.query('count by (__name__) ({__name__=~"marketflow_.+"})')
    }
    assert exported == set(families), (sorted(exported - set(families)),
                                       sorted(set(families) - exported))  # fmt: skip

    # Moving: every counter and histogram grows between two scrapes while traffic flows.
    moving = {f: moving_expr(f, k) for f, k in families.items() if k != "gauge"}
    before = {f: prom.scalar(e) for f, e in moving.items()}

    def still_flat() -> list[str]:
        events.poke()
        if "marketflow_reconnects_total" not in moved and events.reconnects_asked < 3:
            events.reconnect()
        for f, e in moving.items():
            if f not in moved and prom.scalar(e) > before[f]:
                moved.add(f)
        return sorted(set(moving) - moved)

    moved: set[str] = set()
    poll(still_flat, lambda flat: flat == [], 30, "every counter and histogram moves")

    # Every panel's query returns data (the awaited features' queries need only be valid).
    queries = panel_queries()
    assert len(queries) >= 16
    for q in [q for q in queries if awaiting(q.expr)]:
        prom.query(q.expr)  # a 400 (bad PromQL) fails here
    ready = [q for q in queries if not awaiting(q.expr)]

    def without_data() -> list[str]:
        events.poke()  # rates of rare events (minute writes, rejects) over the last 10 s
        return [f"{q.panel} {q.ref}: {q.expr}" for q in ready if not panel_has_data(prom, q)]

    poll(without_data, lambda empty: empty == [], 20, "every panel query returns data")

    # The alert rules evaluate against the real series without an error.
    def rules() -> list[dict[str, Any]]:
        groups = prom.api("rules")["groups"]
        return [r for g in groups for r in g["rules"]]

    evaluated = poll(rules, lambda rs: bool(rs) and all(r.get("health") == "ok" for r in rs),
                     10, "alert rules evaluated")  # fmt: skip
    assert {r["name"] for r in evaluated} >= {"MarketflowFeedDown", "MarketflowCacheLagHigh"}
    health = d.get("/health")[1]
    assert health["pipeline"]["tick_to_cache_ms"]["n"] > 0
    assert health["pipeline"]["tick_to_cache_ms"]["p99_ms"] >= 0
