"""Loop lag and GC pauses: what /health ``loop_lag`` and ``gc`` and /metrics report."""

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest

from marketflow.app.loop_health import (
    GcPauses,
    Histogram,
    LoopHealth,
    LoopLagMonitor,
    StallTracer,
    YoungCollections,
)


@pytest.fixture
def idle_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that is never run: start() only schedules on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_lag_max_covers_the_current_and_the_previous_window(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    m = LoopLagMonitor(tick_s=0.005, window_s=1.0, clock=lambda: 0.0)
    m.start(idle_loop)  # sets the first window end (1.0)
    m.stop()
    m.record(0.1, 0.030)
    m.record(0.5, 0.002)
    assert m.snapshot()["max_ms"] == 30.0
    m.record(1.2, 0.004)  # a new window: the previous one (30 ms) still counts
    assert m.snapshot()["max_ms"] == 30.0
    m.record(2.3, 0.001)  # two windows on: 30 ms has aged out, 4 ms is the previous one
    assert m.snapshot()["max_ms"] == 4.0
    assert m.snapshot()["max_ms_ever"] == 30.0
    assert m.snapshot()["beats"] == 4


def test_a_window_without_any_beat_forgets_the_older_one(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    m = LoopLagMonitor(tick_s=0.005, window_s=1.0, clock=lambda: 0.0)
    m.start(idle_loop)
    m.stop()
    m.record(0.5, 0.050)
    m.record(3.6, 0.001)  # nothing between 1.0 and 3.6: the 50 ms is two windows old
    assert m.snapshot()["max_ms"] == 1.0


async def test_a_callback_that_blocks_the_loop_shows_as_lag() -> None:
    m = LoopLagMonitor(tick_s=0.002, window_s=5.0)
    m.start()
    try:
        await asyncio.sleep(0.01)
        time.sleep(0.06)  # noqa: ASYNC251 - the point: hold the loop while a beat is due
        await asyncio.sleep(0.01)
    finally:
        m.stop()
    # The stall lasted 60 ms and spanned a due time: at least 60 ms minus one tick was seen.
    assert m.snapshot()["max_ms"] >= 55.0
    assert m.histogram.count >= 2


def test_lag_while_the_loop_thread_is_off_the_cpu_is_not_counted_as_its_work() -> None:
    wall, cpu = [0.0], [0.0]
    m = LoopLagMonitor(tick_s=0.005, window_s=1.0, clock=lambda: wall[0], cpu_clock=lambda: cpu[0])
    loop = asyncio.new_event_loop()
    try:
        m.start(loop)
        wall[0], cpu[0] = 0.045, 0.001  # 40 ms late, 1 ms of CPU: another process ran
        m._beat()
        assert (m.snapshot()["max_ms"], m.snapshot()["cpu_max_ms"]) == (40.0, 0.0)
        wall[0], cpu[0] = 0.080, 0.031  # 30 ms late; 30 ms of CPU over those 35 ms: 25 ours
        m._beat()
        assert (m.snapshot()["max_ms"], m.snapshot()["cpu_max_ms"]) == (40.0, 25.0)
    finally:
        m.stop()
        loop.close()


def test_stop_twice_is_safe_and_start_twice_is_one_timer(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    m = LoopLagMonitor()
    m.start(idle_loop)
    first = m._handle
    m.start(idle_loop)
    assert m._handle is first
    m.stop()
    m.stop()
    assert m._handle is None


def test_histogram_counts_cumulatively_up_to_inf() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 0.5):
        h.observe(v)
    assert h.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert h.count == 4
    assert h.total == pytest.approx(0.5065)


def test_gc_pauses_times_each_collection_by_generation_and_uninstalls() -> None:
    p = GcPauses(keep=3)
    p.install()
    p.install()  # once only
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        p.uninstall()
        p.uninstall()
    assert p._callback not in gc.callbacks
    assert p.collections[0] >= 1
    assert p.collections[2] >= 1
    assert p.max_by_generation[2] > 0
    before = list(p.collections)
    gc.collect(0)
    assert p.collections == before  # no longer counting


def test_gc_recent_percentiles_over_the_kept_pauses() -> None:
    now = [0.0]
    p = GcPauses(keep=100, clock=lambda: now[0], summary_every_s=1.0)
    for i in range(1, 201):  # 1..200 ms: only the last 100 are kept
        p.record(0, i / 1000)
    recent = p.snapshot()["recent"]
    assert recent == {
        "n": 100,
        "p50_ms": 151.0,
        "p99_ms": 200.0,
        "max_ms": 200.0,
        "cpu_p99_ms": 200.0,  # no CPU time given: the wall time stands for it
        "cpu_max_ms": 200.0,
    }
    assert p.snapshot()["max_ms_by_generation"][0] == 200.0
    p.record(1, 0.5, 0.002)  # preempted: 500 ms of wall time, 2 ms on the CPU
    assert p.snapshot()["recent"]["max_ms"] == 200.0  # summarised once per second
    now[0] = 1.5
    assert p.snapshot()["recent"]["max_ms"] == 500.0
    assert p.snapshot()["recent"]["cpu_max_ms"] == 200.0
    assert p.snapshot()["collections"] == [200, 1, 0]


async def test_loop_health_snapshot_has_both_parts_and_closes_twice() -> None:
    lh = LoopHealth()
    lh.start()
    await asyncio.sleep(0.02)
    doc = lh.snapshot()
    await lh.aclose()
    await lh.aclose()
    assert set(doc) == {"loop_lag", "gc"}
    assert doc["loop_lag"]["beats"] >= 1
    assert doc["gc"]["threshold"] == list(gc.get_threshold())


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)


async def test_the_stall_tracer_logs_how_long_the_loop_was_held_and_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = LoopHealth(LoopLagMonitor(tick_s=0.002), stall_log_s=0.02)
    health.start()
    try:
        await asyncio.sleep(0.05)
        _hold_the_loop(0.15)
        await asyncio.sleep(0.05)  # the beat runs, and the tracer reports the stall
        await asyncio.sleep(0.05)
    finally:
        await health.aclose()
    held = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loop_held ")]
    assert len(held) == 1, held
    assert health.stalls.stalls == 1
    fields = dict(part.split("=", 1) for part in held[0].split()[1:])
    assert 140 <= float(fields["ms"]) < 1000
    assert float(fields["cpu_ms"]) < 20  # held by a sleep: off the CPU, the OS's doing
    assert fields["at"].endswith("_hold_the_loop")  # the innermost frame comes last
    assert "test_the_stall_tracer_logs" in fields["at"]


def test_a_beat_that_ran_on_time_is_no_stall_though_the_tracer_saw_it_late(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The tracer's own thread waited for the core: it saw the due time 1 s past, but the
    # beat had run 0.1 ms late meanwhile.
    now = [1.0]
    monitor = LoopLagMonitor(tick_s=0.002, clock=lambda: now[0])
    monitor._due = 0.0
    tracer = StallTracer(monitor, threshold_s=0.004)
    tracer.start()  # looks at this thread's stack as the loop's
    time.sleep(0.02)  # the tracer takes the due time as stalled
    monitor.recent.append((0.0, 0.0001, 0.0))
    monitor._due = 2.0
    time.sleep(0.02)
    tracer.stop()
    assert tracer.stalls == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("loop_held ")]


async def test_no_stall_tracer_runs_when_its_threshold_is_zero() -> None:
    health = LoopHealth(stall_log_s=0.0)
    health.start()
    try:
        assert health.stalls._thread is None
    finally:
        await health.aclose()


def test_a_long_collection_is_logged_with_what_it_freed(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    pauses = GcPauses(clock=lambda: now[0], cpu_clock=lambda: now[0], log_above_s=0.02)
    pauses._callback("start", {"generation": 0})
    now[0] = 0.01
    pauses._callback("stop", {"generation": 0, "collected": 3})  # 10 ms: under the bar
    pauses._callback("start", {"generation": 0})
    now[0] = 0.05
    pauses._callback("stop", {"generation": 0, "collected": 250_000})
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gc_pause")]
    assert len(logged) == 1
    assert logged[0].startswith("gc_pause ms=40 cpu_ms=40 generation=0 collected=250000 young=")
    assert pauses.collections == [2, 0, 0]


async def test_young_collections_run_on_their_clock_with_the_middle_generation() -> None:
    done: list[int] = []

    def collect(generation: int) -> int:
        done.append(generation)
        return 0

    young = YoungCollections(0.001, collect=collect)
    young.start()
    young.start()  # one timer
    try:
        for _ in range(200):
            await asyncio.sleep(0.001)
            if len(done) >= 20:
                break
    finally:
        young.stop()
    n = len(done)
    assert n >= 20
    assert set(done) == {1}
    assert young.runs == n
    await asyncio.sleep(0.01)
    assert len(done) == n  # stopped


def test_young_collections_are_off_at_zero(idle_loop: asyncio.AbstractEventLoop) -> None:
    young = YoungCollections(0.0)
    young.start(idle_loop)
    assert young._handle is None
