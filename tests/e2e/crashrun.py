"""One daemon process between scripted exchanges and private PostgreSQL/Redis servers, killed
and restarted by a test; the final checks of rows and API answers against the oracle."""

from __future__ import annotations

import dataclasses
import signal
import socket
import time
import urllib.parse
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from tests.e2e import oracle
from tests.e2e.oracle import Kill, Minute, Row
from tests.e2e.procs import Daemon
from tests.e2e.scripted import ExchangeClock, ScriptedExchange, Tick, wall_ms
from tests.harness.services import PostgresServer, RedisServer

SYMBOLS = ["BTCUSDT", "ETHUSDT", "DOGEUSDT"]
RETENTION_S = 600


def until(wall_s: float) -> None:
    """Scenario timing (when to kill, how long to run), never a wait for a result."""
    time.sleep(max(0.0, wall_s - time.time()))


def ms_of(rfc3339: str) -> int:
    return round(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def redis_keys(rd: RedisServer) -> int:
    with socket.create_connection(("127.0.0.1", rd.port), timeout=2) as s:
        s.sendall(b"DBSIZE\r\n")
        reply = s.recv(64)
    assert reply.startswith(b":"), reply
    return int(reply[1:].strip())


class CrashRun:
    """Exchanges, the daemon and everything the test needs to judge what it stored."""

    def __init__(
        self,
        tmp: Path,
        pg: PostgresServer,
        rd: RedisServer,
        clock: ExchangeClock,
        seed: int,
        n_exchanges: int = 2,
    ) -> None:
        self.pg, self.rd, self.clock = pg, rd, clock
        self.exchanges = [
            ScriptedExchange(f"scripted{i}", SYMBOLS, clock, seed * 10 + i)
            for i in range(1, n_exchanges + 1)
        ]
        for ex in self.exchanges:
            ex.start()
        self.daemon = Daemon(tmp, self.config(tmp))
        self.kills: list[Kill] = []
        self.samples: list[tuple[str, dict[oracle.Key, Row]]] = []
        self.errors: list[str] = []

    def config(self, tmp: Path) -> dict[str, Any]:
        return {
            "pairs": SYMBOLS,
            "http": {"host": "127.0.0.1", "port": 0},
            "postgres": {
                "dsn": self.pg.dsn,
                "connect_timeout_s": 2.0,
                "unreachable_at_start": "wait",
            },
            "redis": {"url": self.rd.url, "connect_timeout_s": 1.0, "unreachable_at_start": "wait"},
            "embedded": {"data_dir": str(tmp / "var")},
            "pipeline": {
                "stale_after_s": 10.0,
                "reconnect_initial_s": 0.1,
                "reconnect_max_s": 0.5,
                "window_retention_s": RETENTION_S,
                "minute_grace_ms": oracle.GRACE_MS,
            },
            "capture": {"enabled": False},
            "exchanges": [
                {"name": ex.name, "host": "127.0.0.1", "port": ex.port, "protocol": "json"}
                for ex in self.exchanges
            ],
        }

    # -- steps -----------------------------------------------------------------------------

    def start(self, label: str) -> None:
        """Start the daemon; return once it stores in PostgreSQL, caches in Redis and has
        folded a tick sent after this moment from every exchange."""
        ex_at = self.clock.now_ms()
        self.daemon.start()
        health = self.daemon.wait_for(
            "/health",
            lambda s, b: b["postgres"]["state"] == "up" and b["redis"]["state"] == "up",
        )
        assert health["postgres"]["kind"] == "postgres", health  # never a silent fallback
        assert health["redis"]["kind"] == "redis", health
        for ex in self.exchanges:
            self.daemon.wait_for(
                f"/prices/latest/{ex.name}/{SYMBOLS[0]}",
                lambda s, b: s == 200 and ms_of(b["timestamp"]) >= ex_at,
            )
        self.sample(f"after start {label}")

    def sample(self, label: str) -> None:
        self.samples.append((label, oracle.read_rows(self.pg.dsn)))

    def kill(self, *, wipe_redis: bool) -> None:
        """SIGKILL the daemon now; with ``wipe_redis`` restart Redis empty while it is down."""
        self.sample(f"before kill {len(self.kills) + 1}")
        at, ex_ms = time.time(), self.clock.now_ms()
        assert self.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        self.kills.append(Kill(at, ex_ms, wipe_redis))
        if wipe_redis:
            self.rd.restart()  # no persistence: it comes back empty
            assert redis_keys(self.rd) == 0

    def pause_feed(self, paused: bool) -> None:
        for ex in self.exchanges:
            ex.pause(paused)

    def close(self) -> None:
        try:
            self.daemon.stop()
        finally:
            for ex in self.exchanges:
                ex.close()

    # -- judging ---------------------------------------------------------------------------

    def ticks(self) -> list[Tick]:
        return [t for ex in self.exchanges for t in list(ex.ticks)]

    def minutes(self) -> dict[oracle.Key, Minute]:
        conns = {ex.name: ex.conns for ex in self.exchanges}
        return oracle.classify(self.ticks(), conns, self.kills)

    def settle(
        self, minutes: dict[oracle.Key, Minute], timeout: float = 15
    ) -> dict[oracle.Key, Row]:
        """Poll until every closed minute holds its must ticks and the table stopped changing
        (or the deadline passed: the checks then say what is missing)."""
        deadline = time.monotonic() + timeout
        last: dict[oracle.Key, Row] | None = None
        while True:
            rows = oracle.read_rows(self.pg.dsn)
            now = wall_ms()
            done = all(
                (r := rows.get(k)) is not None and r.count >= len(m.must)
                for k, m in minutes.items()
                if m.must and k[2] + 60_000 + oracle.GRACE_MS < now
            )
            if (done and rows == last) or time.monotonic() > deadline:
                self.samples.append(("final", rows))
                return rows
            last = rows
            time.sleep(0.3)

    def check_store_and_history(self) -> tuple[dict[oracle.Key, Minute], dict[oracle.Key, Row]]:
        """Rows against the oracle, no row ever shrank, all-history answers = table (+ open)."""
        minutes = self.minutes()
        rows = self.settle(minutes)
        now = wall_ms()
        self.errors += oracle.check_rows(rows, minutes, now)
        self.errors += oracle.shrinks(self.samples)
        for ex in self.exchanges:
            for sym in SYMBOLS:
                self._check_all_history(rows, minutes, ex.name, sym)
        return minutes, rows

    def _check_all_history(
        self, rows: dict[oracle.Key, Row], minutes: dict[oracle.Key, Minute], ex: str, sym: str
    ) -> None:
        now = wall_ms()
        known, open_part = oracle.expected_all_history(rows, minutes, ex, sym, now)
        got = self._stats(f"{ex}/{sym}")
        if isinstance(got, str):
            self.errors.append(f"all-history {ex} {sym}: {got}")
            return
        self.errors += oracle.check_subset(
            f"all-history {ex} {sym} vs table+open minutes", open_part, *got, known=known
        )
        sent = oracle.merged(m for k, m in minutes.items() if k[:2] == (ex, sym))
        self.errors += oracle.check_subset(f"all-history {ex} {sym} vs sent", sent, *got)

    def _stats(self, path: str) -> tuple[int, float, float, float] | str:
        """(count, lowest, highest, average) from the three stat routes, or what went wrong."""
        out: dict[str, Any] = {}
        for stat in ("average", "lowest", "highest"):
            status, body = self.daemon.get(f"/prices/{stat}/{path}")
            if status != 200:
                return f"{stat}: HTTP {status} {body}"
            out[stat] = body
        avg = out["average"]
        return avg["count"], out["lowest"]["price"], out["highest"]["price"], avg["price"]

    def check_period(self, gap: tuple[int, int]) -> None:
        """``?period=Ns`` with its start inside ``gap`` (exchange ms without ticks): the answer
        covers every tick after the gap, whatever a period's second-rounding is."""
        lo, hi = gap
        conns = {ex.name: ex.conns for ex in self.exchanges}
        for ex in self.exchanges:
            for sym in SYMBOLS:
                for _ in range(8):
                    p = round((wall_ms() + 100 - (lo + 1500)) / 1000)
                    before = wall_ms()
                    q = urllib.parse.urlencode({"period": f"{p}s"})
                    got = self._stats(f"{ex.name}/{sym}?{q}")
                    after = wall_ms()
                    if lo + 300 <= before - p * 1000 and after - p * 1000 <= hi - 1500:
                        break
                else:
                    raise AssertionError("could not place a period start inside the gap")
                m = Minute()
                for t in ex.ticks:
                    if t.symbol == sym and hi <= t.ts <= before:
                        m.add(t.price, oracle.is_must(t, conns, self.kills))
                if isinstance(got, str):
                    self.errors.append(f"period={p}s {ex.name} {sym}: {got}")
                    continue
                self.errors += oracle.check_subset(f"period={p}s {ex.name} {sym}", m, *got)

    def dump(self, path: Path) -> None:
        """Everything needed for a post-mortem: per minute what was sent (must/optional
        prices) and every sampled row."""
        minutes = self.minutes()
        doc = {
            "kills": [dataclasses.asdict(k) for k in self.kills],
            "conns": {ex.name: [dataclasses.asdict(c) for c in ex.conns] for ex in self.exchanges},
            "minutes": {
                "|".join(map(str, key)): {"must": m.must, "optional": m.optional}
                for key, m in minutes.items()
            },
            "samples": [
                {
                    "label": label,
                    "rows": {
                        "|".join(map(str, k)): dataclasses.astuple(r) for k, r in rows.items()
                    },
                }
                for label, rows in self.samples
            ],
        }
        path.write_bytes(orjson.dumps(doc))

    def assert_no_errors(self, seed: int) -> None:
        """One failure listing every kind of violation found (a few examples of each)."""
        if not self.errors:
            return
        kinds: dict[str, list[str]] = {}
        for e in self.errors:
            kind = next((k for k in KINDS if k in e), "other")
            kinds.setdefault(kind, []).append(e)
        parts = [f"seed={seed}: {len(self.errors)} violations"]
        for kind, errs in kinds.items():
            parts.append(f"-- {len(errs)} x {kind}:")
            parts.extend(errs[:6])
        dump = self.daemon.log_path.parent / "exactness-dump.json"
        self.dump(dump)
        parts.append(f"kills={self.kills}\nrows, samples and ticks per minute: {dump}")
        parts.append(f"--- daemon log tail ---\n{self.daemon.log()[-2000:]}")
        raise AssertionError("\n".join(parts))


KINDS = (
    "all-history",
    "period=",
    "shrank",
    "missing",
    "lost ticks",
    "counted twice",
    "expected exactly",
    "late_ticks",
    "no tick was sent",
    "outside what was sent",
    "miss a must tick",
    "not that of any subset",
)
