"""Services killed mid-minute: the daemon restarted at once writes every minute whole, once.

The three simulators send 10 ticks per second per pair, so a minute the daemon saw entirely
holds 600 ticks per exchange x pair (a few more when a 100 ms round lands on the boundary).
Ticks sent while the daemon was down are lost by design (the feed does not buffer them); the
bounds below allow exactly for that downtime, measured on the feed's own timestamps.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.e2e.conftest import PAIRS, Stack
from tests.e2e.procs import (
    Daemon,
    assert_real_stack,
    feed_time_ms,
    minute_rows,
    poll,
    wait_feed_time,
)

pytestmark = pytest.mark.e2e

TICKS_PER_S = 10  # per pair per simulator
Key = tuple[str, str, int]  # exchange, pair, minute start (epoch ms)


def rows_by_key(dsn: str) -> dict[Key, asyncpg.Record]:
    rows = asyncio.run(minute_rows(dsn))
    out = {(r["exchange"], r["pair_name"], r["minute_ms"]): r for r in rows}
    assert len(out) == len(rows), "more than one row for an (exchange, pair, minute)"
    return out


def next_minute_start() -> int:
    return (int(time.time()) // 60 + 1) * 60


def wait_all_flowing(d: Daemon, exchanges: list[str]) -> None:
    for ex in exchanges:
        for pair in PAIRS:
            d.wait_for(f"/prices/latest/{ex}/{pair}", lambda s, b: s == 200 and b["price"] > 0)


def restart_and_measure_downtime(d: Daemon, exchanges: list[str], down_at_s: float) -> float:
    """Start the daemon again; seconds from ``down_at_s`` to the first new tick seen, the
    longest over the exchanges (an upper bound of the gap in every minute row)."""
    d.start()
    worst = 0.0
    for ex in exchanges:
        body = d.wait_for(
            f"/prices/latest/{ex}/BTCUSDT",
            lambda s, b: s == 200 and feed_time_ms(b) > down_at_s * 1000,
        )
        worst = max(worst, feed_time_ms(body) / 1000 - down_at_s)
    assert_real_stack(d)
    return worst


def lowest_count(downtime_s: float) -> int:
    # Lost: ticks sent while down, plus those of the last flush interval before a SIGKILL.
    return 600 - math.ceil(downtime_s * TICKS_PER_S) - 2


def wait_whole_minute(
    d: Daemon, dsn: str, names: list[str], minute_s: int, downtime_s: float
) -> dict[Key, asyncpg.Record]:
    """Poll PostgreSQL until the minute's row of every exchange x pair holds at least the
    ticks the daemon saw (it closes a little after its end); the rows then."""
    lowest = lowest_count(downtime_s)
    keys = [(ex, pair, minute_s * 1000) for ex in names for pair in PAIRS]

    def complete(rows: dict[Key, asyncpg.Record]) -> bool:
        return all(k in rows and rows[k]["tick_count"] >= lowest for k in keys)

    try:
        return poll(lambda: rows_by_key(dsn), complete, minute_s + 90 - time.time(), "whole minute")
    except AssertionError as exc:  # say what the daemon saw: lost ticks or a slow feed
        short = {k: r["tick_count"] for k, r in rows_by_key(dsn).items() if k[2] == minute_s * 1000}
        raise AssertionError(
            f"{exc}\nminute {minute_s}: counts {short}, lowest {lowest}\n"
            f"--- daemon log tail ---\n{d.log()[-4000:]}"
        ) from None


def assert_whole_minute(
    rows: dict[Key, asyncpg.Record], names: list[str], minute_s: int, downtime_s: float
) -> None:
    lowest = lowest_count(downtime_s)
    for ex in names:
        for pair in PAIRS:
            r = rows.get((ex, pair, minute_s * 1000))
            assert r is not None, (ex, pair, minute_s)
            assert lowest <= r["tick_count"] <= 610, (dict(r), lowest, downtime_s)
            assert r["min_price"] <= r["average_price"] <= r["max_price"]


@pytest.mark.timeout(260)
def test_sigkill_then_sigterm_mid_minute_restart_rewrites_each_minute_whole_never_doubled(
    stack: Stack,
) -> None:
    d, names = stack.daemon, [s.name for s in stack.sims]
    assert_real_stack(d)
    wait_all_flowing(d, names)
    first = next_minute_start()  # the daemon is up for the whole of this minute

    # (a) SIGKILL mid-minute, restart at once: the window comes back from Redis.
    wait_feed_time(d, first + 15)
    killed_at = time.time()
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    downtime = restart_and_measure_downtime(d, names, killed_at)
    assert downtime < 15, downtime  # else the minute below is not "mid-minute" any more
    rows = wait_whole_minute(d, stack.postgres.dsn, names, first, downtime)
    assert_whole_minute(rows, names, first, downtime)

    # (b) SIGTERM mid-minute: the partial minute is written at shutdown, then rewritten
    # whole (with the ticks from before the stop, not added twice) after the restart.
    second = first + 60
    wait_feed_time(d, second + 15)
    stopped_at = time.time()
    d.terminate()
    partial = rows_by_key(stack.postgres.dsn)
    most = math.ceil((stopped_at - second) * TICKS_PER_S) + 20
    for ex in names:
        for pair in PAIRS:
            r = partial.get((ex, pair, second * 1000))
            assert r is not None, f"partial minute not written at shutdown: {ex} {pair}"
            assert 140 <= r["tick_count"] <= most, (dict(r), most)
    downtime = restart_and_measure_downtime(d, names, stopped_at)
    assert downtime < 15, downtime
    rows = wait_whole_minute(d, stack.postgres.dsn, names, second, downtime)
    assert_whole_minute(rows, names, second, downtime)
    for key in [k for k in partial if k[2] == first * 1000]:  # the earlier minute is untouched
        assert rows[key]["tick_count"] == partial[key]["tick_count"]


def read_spill(path: Path) -> dict[Key, dict[str, float]]:
    out: dict[Key, dict[str, float]] = {}
    for line in path.read_bytes().splitlines():
        d = orjson.loads(line)
        if "marks" in d:  # the sources' resume positions spilled with the rows
            continue
        out[(d["exchange"], d["symbol"], d["minute_ms"])] = d  # a later line supersedes
    return out


@pytest.mark.timeout(150)
def test_sigterm_while_postgres_down_spills_rows_and_restart_writes_each_once(
    stack: Stack, tmp_path: Path
) -> None:
    d, names = stack.daemon, [s.name for s in stack.sims]
    assert_real_stack(d)
    wait_all_flowing(d, names)
    # The spill file is named after the database it is for (never drained into another).
    spill = Path(d.get("/health")[1]["postgres"]["spill_path"])
    assert spill.parent == tmp_path / "var" / "spill"
    assert spill.name.startswith("minutes-postgres-")
    # Stop and restart well inside one minute (compared below), with ticks of it stored.
    at = time.time() + 2 if time.time() % 60 <= 38 else next_minute_start() + 3
    wait_feed_time(d, at)
    minute = int(at) // 60 * 60_000
    stack.postgres.stop()
    d.terminate()
    assert spill.exists(), d.log()[-3000:]
    spilled = read_spill(spill)
    assert {(ex, p) for ex, p, m in spilled if m == minute} == {
        (ex, p) for ex in names for p in PAIRS
    }
    assert "minute_rows_spilled" in d.log()

    stack.postgres.start()
    d.start()
    assert_real_stack(d)
    d.wait_for(
        "/health",
        lambda s, b: (
            b["postgres"]["state"] == "up"
            and b["postgres"]["spilled_rows"] == 0
            and b["postgres"]["pending_rows"] == 0
        ),
    )
    assert not spill.exists()
    rows = rows_by_key(stack.postgres.dsn)  # asserts one row per key
    assert int(time.time()) // 60 * 60_000 == minute, "test too slow: the minute closed"
    for key, s in spilled.items():
        r = rows.get(key)
        assert r is not None, f"spilled row lost: {key}"
        # The open minute is not rewritten before it closes: the row is the spilled one.
        assert r["tick_count"] == s["count"], (dict(r), s)
        assert (r["min_price"], r["max_price"]) == (s["low"], s["high"])
        assert r["average_price"] == pytest.approx(s["average"], rel=1e-12)
