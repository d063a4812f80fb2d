"""A whole stack per test: three simulator processes, private PostgreSQL and Redis, the daemon."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.procs import Daemon, Simulator
from tests.harness.services import PostgresServer, RedisServer, free_port

PAIRS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]


@dataclass
class Stack:
    sims: list[Simulator]
    daemon: Daemon
    postgres: PostgresServer
    redis: RedisServer


def daemon_config(
    tmp: Path, sims: list[Simulator], pg: PostgresServer, rd: RedisServer
) -> dict[str, object]:
    return {
        "pairs": PAIRS,
        "http": {"host": "127.0.0.1", "port": 0},
        # "wait": a slow server must never turn into a silent SQLite / in-process fallback.
        "postgres": {"dsn": pg.dsn, "connect_timeout_s": 2.0, "unreachable_at_start": "wait"},
        "redis": {"url": rd.url, "connect_timeout_s": 1.0, "unreachable_at_start": "wait"},
        "embedded": {"data_dir": str(tmp / "var")},
        "pipeline": {"stale_after_s": 3.0, "reconnect_initial_s": 0.2, "reconnect_max_s": 2.0},
        "capture": {"enabled": True, "port": free_port()},
        "exchanges": [
            {"name": s.name, "host": "127.0.0.1", "port": s.port, "protocol": "json"} for s in sims
        ],
    }


@pytest.fixture
def stack(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[Stack]:
    sims = [Simulator(tmp_path, f"exchange{i}") for i in (1, 2, 3)]
    for s in sims:
        s.start()
    daemon = Daemon(tmp_path, daemon_config(tmp_path, sims, private_postgres, private_redis))
    daemon.start()
    try:
        yield Stack(sims, daemon, private_postgres, private_redis)
    finally:
        daemon.stop()
        for s in sims:
            s.stop()
