"""The archive as a user runs it: ``python -m marketflow archive`` beside a running daemon on
real PostgreSQL and Redis; the daemon's all-history answers are the same before and after,
and /health counts a late row refused for an archived day."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.e2e.conftest import daemon_config
from tests.e2e.procs import ROOT, Daemon, to_toml
from tests.harness.services import PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.e2e

DAY_MS = 86_400_000


async def seed(dsn: str, now_ms: int) -> int:
    """Minute rows 10, 9 and 2 days ago (an hour of them per day); returns how many are old."""
    conn = await asyncpg.connect(dsn)
    rows = []
    try:
        for days_ago in (10, 9, 2):
            day = (now_ms - days_ago * DAY_MS) // DAY_MS * DAY_MS
            for k in range(60):
                price = 100.0 + days_ago + k % 7
                rows.append(("BTCUSDT", "ex1", day + k * 60_000, price, price - 1, price + 2, 3))
        await conn.executemany(
            "INSERT INTO minute_prices (pair_name, exchange, timestamp, average_price,"
            " min_price, max_price, tick_count, covered_ms) VALUES ($1, $2,"
            " to_timestamp($3 / 1000.0), $4, $5, $6, $7, 60000)",
            rows,
        )
    finally:
        await conn.close()
    return 120


def all_history(d: Daemon) -> list[Any]:
    out = []
    for stat in ("highest", "lowest", "average"):
        for path in (f"/prices/{stat}/BTCUSDT", f"/prices/{stat}/ex1/BTCUSDT"):
            status, body = d.get(path)
            assert status == 200, body
            if stat == "average":
                body.pop("timestamp")  # "now" for an average
            out.append(body)
    return out


def test_archive_beside_the_daemon_keeps_all_history_answers(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> None:
    archive_dir = tmp_path / "archive"
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    # A feed nobody serves: "all" means this exchange, every answer comes from storage.
    config["exchanges"] = [{"name": "ex1", "host": "127.0.0.1", "port": free_port()}]
    config["archive"] = {"dir": str(archive_dir)}
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        old = asyncio.run(seed(private_postgres.dsn, int(time.time() * 1000)))
        before = all_history(daemon)
        assert before[4]["count"] == 180 * 3  # the average over all history: every tick

        argv = ["archive", "--older-than", "7d", "--out", str(archive_dir)]
        done = subprocess.run(
            [sys.executable, "-m", "marketflow", *argv, "--config", str(daemon.config_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        days = [x for x in lines if x.get("table") == "minute_prices" and "day" in x]
        assert [(x["status"], x["action"], x["rows"]) for x in days] == [
            ("ok", "exported+deleted", 60),
            ("ok", "exported+deleted", 60),
        ]
        assert {"table": "minute_prices", "days": 2, "rows": old, "status": "ok"} in lines
        assert all_history(daemon) == before

        health = daemon.wait_for("/health", lambda s, b: b["archive"]["archived_days"] == 2)
        assert health["archive"]["refused_archived_rows"] == 0
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()


def test_archive_cli_without_postgres_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(to_toml({"embedded": {"data_dir": str(tmp_path / "var")}}))
    done = subprocess.run(
        [sys.executable, "-m", "marketflow", "archive", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "archive needs PostgreSQL" in done.stderr


def test_scheduled_archive_runs_in_the_daemon(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> None:
    archive_dir = tmp_path / "archive"
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    config["exchanges"] = [{"name": "ex1", "host": "127.0.0.1", "port": free_port()}]
    config["archive"] = {
        "enabled": True,
        "dir": str(archive_dir),
        "older_than": "7d",
        "interval": "1s",
    }
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        asyncio.run(seed(private_postgres.dsn, int(time.time() * 1000)))
        health = daemon.wait_for(
            "/health",
            lambda s, b: (
                b["archive"]["archived_days"] == 2
                and (b["archive"]["last_run"] or {}).get("status") == "ok"
            ),
        )
        assert health["archive"]["scheduled"] is True
    finally:
        daemon.stop()
    manifest = json.loads((archive_dir / "manifest.json").read_text())
    assert sorted(f["state"] for f in manifest["files"]) == ["archived", "archived"]
