"""``python -m marketflow replay FILE``: a JSONL capture through the pipeline into storage."""

from __future__ import annotations

import asyncio
import math
import random
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from tests.e2e.procs import ROOT, minute_rows, to_toml
from tests.harness.services import PostgresServer

pytestmark = pytest.mark.e2e

Tick = tuple[str, float, int]


def write_capture(path: Path, ticks: list[Tick]) -> None:
    path.write_bytes(
        b"".join(
            orjson.dumps({"symbol": s, "price": p, "timestamp": ts}) + b"\n" for s, p, ts in ticks
        )
    )


def replay(tmp: Path, capture: Path, pace: list[str], dsn: str) -> tuple[int, str]:
    """Run the replay command; its exit code and its log (stderr)."""
    config = tmp / "replay.toml"
    config.write_text(
        to_toml(
            {
                "postgres": {"dsn": dsn, "connect_timeout_s": 2.0, "unreachable_at_start": "wait"},
                "redis": {"url": ""},
                "embedded": {"data_dir": str(tmp / "var")},
            }
        )
    )
    argv = [sys.executable, "-m", "marketflow", "replay", str(capture), *pace]
    done = subprocess.run(
        [*argv, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def capture_over_whole_minutes(first_minute_ms: int, minutes: int) -> list[Tick]:
    """Known ticks in every ms position that matters: minute edges, same-ms duplicates."""
    rng = random.Random(42)
    ticks: list[Tick] = []
    for m in range(minutes):
        start = first_minute_ms + m * 60_000
        for symbol, base in (("BTCUSDT", 100_000.0), ("ETHUSDT", 3000.0), ("DOGEUSDT", 0.3)):
            stamps = [start, start + 59_999, *(start + rng.randrange(60_000) for _ in range(300))]
            for ts in sorted(stamps):
                price = round(base * (1 + rng.uniform(-0.02, 0.02)), 8)
                ticks.append((symbol, price, ts))
                if ts % 7 == 0:  # the same price twice in one millisecond: both count
                    ticks.append((symbol, price, ts))
    ticks.sort(key=lambda t: t[2])
    return ticks


def test_replay_max_writes_minute_rows_exactly_matching_the_capture(
    tmp_path: Path, private_postgres: PostgresServer
) -> None:
    first_minute_ms = (int(time.time()) // 60 - 4) * 60_000  # three whole minutes in the past
    ticks = capture_over_whole_minutes(first_minute_ms, 3)
    capture = tmp_path / "capture.jsonl"
    write_capture(capture, ticks)

    code, log = replay(tmp_path, capture, ["--max"], private_postgres.dsn)
    assert code == 0, log
    assert f"ticks={len(ticks)} rejected=0" in log
    assert "storage_embedded" not in log  # the rows below are read from PostgreSQL

    expected: dict[tuple[str, int], list[float]] = {}
    for symbol, price, ts in ticks:
        expected.setdefault((symbol, ts // 60_000 * 60_000), []).append(price)
    rows = asyncio.run(minute_rows(private_postgres.dsn, "replay"))
    got = {(r["pair_name"], r["minute_ms"]): r for r in rows}
    assert len(got) == len(rows) == 9
    assert set(got) == set(expected)
    for key, prices in expected.items():
        r = got[key]
        assert r["tick_count"] == len(prices), key
        assert r["min_price"] == min(prices), key
        assert r["max_price"] == max(prices), key
        assert math.isclose(r["average_price"], math.fsum(prices) / len(prices), rel_tol=1e-12)

    # Replaying the same capture again rewrites the rows, never doubles them.
    code, log = replay(tmp_path, capture, ["--max"], private_postgres.dsn)
    assert code == 0, log
    again = asyncio.run(minute_rows(private_postgres.dsn, "replay"))
    assert {(r["pair_name"], r["minute_ms"]): r["tick_count"] for r in again} == {
        k: len(v) for k, v in expected.items()
    }


_STAMP = r"ts=(\S+)Z .*"


def _log_time(log: str, event: str) -> float:
    m = re.search(_STAMP + event, log)
    assert m is not None, f"no {event} in:\n{log}"
    return datetime.fromisoformat(m.group(1) + "+00:00").timestamp()


def test_replay_speed_10_paces_the_capture_ten_times_faster_and_max_does_not_pace(
    tmp_path: Path,
) -> None:
    """Pacing is a lower bound (a loaded machine only makes a replay slower): --speed 10 never
    runs ahead of a tenth of the capture's span; --max never waits for it."""
    span_s = 20.0
    start_ms = (int(time.time()) - 120) * 1000
    ticks = [("SOLUSDT", 200.0 + i / 100, start_ms + i * 200) for i in range(int(span_s * 5) + 1)]
    capture = tmp_path / "short.jsonl"
    write_capture(capture, ticks)

    code, log = replay(tmp_path, capture, ["--max"], "")
    assert code == 0, log
    assert f"ticks={len(ticks)} rejected=0" in log
    max_s = _log_time(log, "replay_finished") - _log_time(log, "replay_started")
    code, log = replay(tmp_path, capture, ["--speed", "10"], "")
    assert code == 0, log
    assert f"ticks={len(ticks)} rejected=0" in log
    replay_s = _log_time(log, "replay_finished") - _log_time(log, "replay_started")
    assert replay_s >= span_s / 10 - 0.05, replay_s  # paced: not faster than 10x
    assert replay_s < span_s * 0.75, replay_s  # not at speed 1 (20 s); generous for load
    assert max_s < span_s / 2, max_s  # --max: not paced at all (generous for load)
