"""Issue 9, end to end: the real daemon SIGKILLed under load and restarted against real
PostgreSQL and Redis; every minute row, the all-history and ``?period=`` answers are judged
against what the scripted exchanges sent (tests/e2e/oracle.py says what "must" means).

Exchange time is compressed (tests/e2e/scripted.py): it starts 20+ minutes in the past and runs
16-70x faster than the wall clock, so the window retention (600 s of exchange time) passes in
seconds and past minutes close at once (the daemon closes a minute 2 s after its end by the
later of the wall clock and the newest exchange timestamp, and the oracle assumes just that).
It catches up with the wall clock a few seconds before a real minute boundary, where the last
kill lands inside the 2 s grace or across the boundary, so the minute that was open at the kill
is exercised for real. Seeded: set MARKETFLOW_E2E_SEED to replay a run's choices (the seed is
printed and in every failure; timing still varies with the start time).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.crashrun import CrashRun, until
from tests.e2e.scripted import ExchangeClock, wall_ms
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

SPAN_S = 1200  # exchange time covered before catching up with the wall clock


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MARKETFLOW_E2E_SEED", time.time_ns() % 1_000_000))
    print(f"MARKETFLOW_E2E_SEED={value}")
    return value


def boundary_plan() -> tuple[int, ExchangeClock]:
    """A real minute boundary B 28-88 s away, and a clock that reaches the wall clock at
    B - 8 s after covering SPAN_S of exchange time."""
    t0 = time.time()
    boundary = (int(t0 + 28) // 60 + 1) * 60
    catch_up = boundary - 8
    clock = ExchangeClock(int((t0 - SPAN_S) * 1000), 1 + SPAN_S / (catch_up - t0))
    clock.t0 = t0
    # No ticks in the first 4 s of the minute before the one that ends at B: a period answer
    # can start there whatever its rounding (see CrashRun.check_period).
    clock.gaps.append(((boundary - 120) * 1000, (boundary - 116) * 1000))
    return boundary, clock


@pytest.fixture
def run_at_boundary(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer, seed: int
) -> Iterator[tuple[CrashRun, int]]:
    boundary, clock = boundary_plan()
    run = CrashRun(tmp_path, private_postgres, private_redis, clock, seed)
    try:
        yield run, boundary
    finally:
        run.close()


def kill_repeatedly(run: CrashRun, rng: random.Random, stop_at: float, *, wipe: bool) -> None:
    """SIGKILL at random moments while exchange time races, restart at once or a bit later."""
    n = 0
    while time.time() + 7 < stop_at:
        until(time.time() + rng.uniform(0.8, 3.0))
        run.kill(wipe_redis=wipe)
        until(time.time() + rng.choice([0.0, 0.0, rng.uniform(0.2, 1.0)]))
        n += 1
        run.start(f"compressed {n}")


@pytest.mark.timeout(200)
def test_sigkill_under_load_keeps_every_minute_exact(
    run_at_boundary: tuple[CrashRun, int], seed: int
) -> None:
    """(a), (d), (e): kills with Redis kept, the last one inside the grace after a real
    minute boundary (its minute then lives only in Redis); late ticks after each restart."""
    run, boundary = run_at_boundary
    rng = random.Random(seed)
    run.start("first")
    kill_repeatedly(run, rng, boundary - 8, wipe=False)

    kill_at = boundary + rng.uniform(0.2, 1.5)  # the minute ending at B is closing
    until(kill_at - 1.3)
    run.pause_feed(True)  # nothing in flight at the kill: the period check below is exact
    until(kill_at)
    run.kill(wipe_redis=False)
    run.pause_feed(False)
    run.start("inside the grace")
    until(time.time() + 3)
    run.pause_feed(True)

    run.check_store_and_history()
    run.check_period(run.clock.gaps[0])
    run.assert_no_errors(seed)


@pytest.mark.timeout(200)
def test_sigkill_with_redis_restarted_empty_keeps_written_minutes(
    run_at_boundary: tuple[CrashRun, int], seed: int
) -> None:
    """(b), (d), (e): each kill with Redis restarted empty while the daemon is down; the last
    one just before a real minute boundary, restarting across it."""
    run, boundary = run_at_boundary
    rng = random.Random(seed + 1)
    run.start("first")
    kill_repeatedly(run, rng, boundary - 8, wipe=True)

    until(boundary - rng.uniform(0.3, 0.9))  # under load, the minute still open
    run.kill(wipe_redis=True)
    run.start("across the boundary")
    until(time.time() + 3)
    run.pause_feed(True)

    run.check_store_and_history()
    run.check_period(run.clock.gaps[0])
    run.assert_no_errors(seed)


@pytest.mark.timeout(120)
def test_restart_after_exchange_time_moved_past_the_retention(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer, seed: int
) -> None:
    """(c), (d): while the daemon is down, exchange time jumps 11 minutes (past the 600 s
    retention), once with Redis kept and once with it emptied. Ticks for minutes before the
    jump, sent after the restart, are older than the retention: counted as late, never
    allowed to rewrite their (full) stored rows."""
    clock = ExchangeClock(wall_ms() - 45 * 60_000, 30.0)
    run = CrashRun(tmp_path, private_postgres, private_redis, clock, seed)
    rng = random.Random(seed + 2)
    try:
        run.start("first")
        for n, (jump, wipe) in enumerate(
            [(False, False), (True, False), (False, True), (True, True)]
        ):
            until(time.time() + rng.uniform(1.5, 3.0))
            before_jump = clock.now_ms()
            run.kill(wipe_redis=wipe)
            if jump:
                clock.jump(11 * 60_000)
            run.start(f"restart {n + 1}")
            if jump:
                too_old = [before_jump - rng.randint(5_000, 90_000) for _ in range(6)]
                for ex in run.exchanges:
                    ex.send_late(too_old, optional=True)
                want = len(too_old) * len(run.exchanges)
                try:
                    run.daemon.wait_for("/health", lambda s, b, w=want: b["late_ticks"] >= w, 5)
                except AssertionError:
                    _, h = run.daemon.get("/health")
                    run.errors.append(
                        f"restart {n + 1}: {want} ticks older than the retention sent, "
                        f"/health late_ticks={h['late_ticks']}"
                    )
        until(time.time() + 2)
        run.pause_feed(True)
        run.check_store_and_history()
        run.assert_no_errors(seed)
    finally:
        run.close()


@pytest.mark.timeout(60)
def test_control_without_kills_every_minute_and_answer_is_exact(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer, seed: int
) -> None:
    """The harness itself: with no kill every row equals the oracle exactly (late ticks
    included) and every all-history answer equals the table, so a violation reported by the
    tests above is the daemon's, not the oracle's."""
    clock = ExchangeClock(wall_ms() - SPAN_S * 1000, 40.0)
    run = CrashRun(tmp_path, private_postgres, private_redis, clock, seed)
    rng = random.Random(seed + 3)
    try:
        run.start("only")
        until(time.time() + 6)
        for ex in run.exchanges:
            ex.send_late(
                [clock.now_ms() - rng.randint(61_000, 300_000) for _ in range(8)], optional=False
            )
        until(time.time() + 2)
        run.pause_feed(True)
        minutes, _ = run.check_store_and_history()
        assert len(minutes) > 20
        assert all(m.exact for m in minutes.values())
        run.assert_no_errors(seed)
    finally:
        run.close()
