"""How well the one event loop keeps up: loop lag and garbage-collector pauses.

Everything (feed reads, parsing, folding, flushes, HTTP) shares one loop, so a callback that
runs for 50 ms delays every HTTP answer by up to 50 ms. ``LoopLagMonitor`` measures that
from the inside: a plain timer callback (no task) asks to run every ``tick_s`` and records
how late it ran. ``GcPauses`` times every cyclic collection through ``gc.callbacks``. Both
cost a few microseconds per event and are read by /health and /metrics.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the lag and pause histograms exported to Prometheus.
BUCKETS_S: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
GC_BUCKETS_S: tuple[float, ...] = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1)


class Histogram:
    """Cumulative-by-export counts per bucket, plus count and sum (Prometheus' model)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float] = BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= it) pairs, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class LoopLagMonitor:
    """The loop's lateness: how long after its due time a timer callback ran.

    ``max_ms`` in the snapshot is the highest lag over the current and the previous
    ``window_s`` (so it always covers at least the last ``window_s``); ``max_ms_ever`` since
    start. A lag shorter than the timer resolution (uvloop: 1 ms) reads as 0-1 ms. A stall is
    seen in full when it spans a due time, which it does for any stall longer than ``tick_s``.

    A late beat is either the loop's own work (a callback holding it) or the OS running
    another process on the core. ``cpu_max_ms`` tells them apart: of a beat's lag, the part
    the loop thread spent on the CPU (its CPU time from scheduling to run, less the tick; no
    CPU time passes while the process waits for the core), highest over the same windows.
    """

    def __init__(
        self,
        tick_s: float = 0.005,
        window_s: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.tick_s = tick_s
        self.window_s = window_s
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._due = 0.0
        self._cpu_at = 0.0  # loop-thread CPU time when the beat was scheduled
        self._cpu_current = 0.0
        self._cpu_previous = 0.0
        self._window_end = 0.0
        self._current = 0.0
        self._previous = 0.0
        self.max_ever = 0.0
        # (due time, lag, CPU part) of the latest beats, for the stall tracer
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=256)
        self.histogram = Histogram()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Begin measuring on ``loop`` (the running loop by default); again is a no-op."""
        if self._handle is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        now = self._clock()
        self._window_end = now + self.window_s
        self._schedule(now)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.tick_s
        self._cpu_at = self._cpu_clock()
        self._handle = self._loop.call_later(self.tick_s, self._beat)

    def _beat(self) -> None:
        now = self._clock()
        lag = max(0.0, now - self._due)
        # CPU spent since scheduling, less the tick it could have spent on time: the part
        # of the lateness that was the loop's own work.
        cpu = max(0.0, min(lag, self._cpu_clock() - self._cpu_at - self.tick_s))
        self.recent.append((self._due, lag, cpu))
        self.record(now, lag, cpu)
        self._schedule(now)

    def record(self, now: float, lag_s: float, cpu_s: float = 0.0) -> None:
        """One observation: ``lag_s`` seconds late at time ``now``, ``cpu_s`` of them the
        loop's own CPU work."""
        if now >= self._window_end:
            # A window with no beat at all (a stall longer than it) leaves this beat's lag.
            missed = now >= self._window_end + self.window_s
            self._previous = 0.0 if missed else self._current
            self._cpu_previous = 0.0 if missed else self._cpu_current
            self._current = self._cpu_current = 0.0
            self._window_end = now + self.window_s
        if lag_s > self._current:
            self._current = lag_s
        if cpu_s > self._cpu_current:
            self._cpu_current = cpu_s
        if lag_s > self.max_ever:
            self.max_ever = lag_s
        self.histogram.observe(lag_s)

    def snapshot(self) -> dict[str, Any]:
        return {
            "max_ms": round(max(self._current, self._previous) * 1000, 1),
            "cpu_max_ms": round(max(self._cpu_current, self._cpu_previous) * 1000, 1),
            "window_s": self.window_s,
            "max_ms_ever": round(self.max_ever * 1000, 1),
            "beats": self.histogram.count,
        }


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class GcPauses:
    """Times every cyclic garbage collection (``gc.callbacks``): count and max per
    generation, and p50/p99/max over the last ``keep`` collections (sorted at most once per
    ``summary_every_s``: sorting 4096 floats takes ~1 ms, too long for every /health)."""

    def __init__(
        self,
        keep: int = 4096,
        clock: Callable[[], float] = time.perf_counter,
        summary_every_s: float = 1.0,
        cpu_clock: Callable[[], float] = time.thread_time,
        log_above_s: float = 0.0,
    ) -> None:
        """``log_above_s`` > 0: a collection that long logs ``gc_pause`` with what it
        collected and how many objects the young generation held when it began (counting
        them costs ~1 ms per 100,000, so only with the stall tracer on). CPython starts a
        young collection after ``threshold`` allocations net of frees, and a free of an old
        object counts too: a daemon that replaces old objects with new ones can hold far
        more young objects than the threshold, and a young collection then takes ~0.4 us
        for each."""
        self._clock = clock
        self._log_above_s = log_above_s
        self._young = 0  # objects in the young generation when the last collection began
        self._cpu_clock = cpu_clock
        self._summary_every_s = summary_every_s
        self._summary: tuple[float, dict[str, Any]] | None = None
        self._started = 0.0
        self._cpu_started = 0.0
        self.recent: deque[float] = deque(maxlen=keep)  # seconds
        # The same pauses in the thread's CPU time: on a shared core a collection can be
        # preempted, and its wall time then says more about the machine than about the GC.
        self.recent_cpu: deque[float] = deque(maxlen=keep)
        self.collections = [0, 0, 0]
        self.max_by_generation = [0.0, 0.0, 0.0]
        self.histogram = Histogram(GC_BUCKETS_S)
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            if self._log_above_s > 0:  # counted before the clocks start: not in the pause
                self._young = len(gc.get_objects(0))
            self._started = self._clock()
            self._cpu_started = self._cpu_clock()
        else:
            cpu = self._cpu_clock() - self._cpu_started
            pause = self._clock() - self._started
            self.record(info["generation"], pause, cpu)
            if 0 < self._log_above_s <= pause:
                log.warning(
                    "gc_pause ms=%.0f cpu_ms=%.0f generation=%d collected=%d young=%d",
                    pause * 1000,
                    cpu * 1000,
                    info["generation"],
                    info.get("collected", 0),
                    self._young,
                )

    def record(self, generation: int, pause_s: float, cpu_s: float | None = None) -> None:
        self.collections[generation] += 1
        if pause_s > self.max_by_generation[generation]:
            self.max_by_generation[generation] = pause_s
        self.recent.append(pause_s)
        self.recent_cpu.append(pause_s if cpu_s is None else cpu_s)
        self.histogram.observe(pause_s)

    def _recent_summary(self) -> dict[str, Any]:
        now = self._clock()
        if self._summary is not None and now - self._summary[0] < self._summary_every_s:
            return self._summary[1]
        recent = sorted(self.recent)
        cpu = sorted(self.recent_cpu)
        summary = {
            "n": len(recent),
            "p50_ms": round(_percentile(recent, 0.50) * 1000, 3),
            "p99_ms": round(_percentile(recent, 0.99) * 1000, 3),
            "max_ms": round((recent[-1] if recent else 0.0) * 1000, 3),
            "cpu_p99_ms": round(_percentile(cpu, 0.99) * 1000, 3),
            "cpu_max_ms": round((cpu[-1] if cpu else 0.0) * 1000, 3),
        }
        self._summary = (now, summary)
        return summary

    def snapshot(self) -> dict[str, Any]:
        return {
            "threshold": list(gc.get_threshold()),
            "collections": list(self.collections),
            "max_ms_by_generation": [round(s * 1000, 2) for s in self.max_by_generation],
            "total_ms": round(self.histogram.total * 1000, 1),
            "recent": self._recent_summary(),
        }


class StallTracer:
    """Where the loop is while it is held: a thread that looks at the loop thread's stack
    while a ``LoopLagMonitor`` beat is ``threshold_s`` overdue and, once the beat has run,
    logs the stall (``loop_held``): its length and the loop thread's CPU time in it (about
    the length when the loop's own work held it, about 0 when the OS ran something else on
    the core), the stack first seen (innermost frame last) and the innermost frames seen
    after it.

    A lag figure says that the loop was held; this says by what. The thread wakes every
    ``threshold_s / 4`` and takes the GIL only for that look.
    """

    def __init__(self, monitor: LoopLagMonitor, threshold_s: float, frames: int = 10) -> None:
        self.monitor = monitor
        self.threshold_s = threshold_s
        self.frames = frames
        self.stalls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread = 0

    def start(self) -> None:
        if self._thread is not None or self.threshold_s <= 0:
            return
        self._loop_thread = threading.get_ident()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="stall-tracer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        monitor = self.monitor
        stalled_due = -1.0
        first = ""
        then: list[str] = []
        while not self._stop.wait(self.threshold_s / 4):
            due = monitor._due  # float reads: atomic under the GIL
            if stalled_due >= 0 and due != stalled_due:  # that beat has run: report it
                beats = list(monitor.recent)  # one C call: the loop thread may append
                lag, cpu = next(
                    ((lag, cpu) for d, lag, cpu in reversed(beats) if d == stalled_due),
                    (monitor._clock() - stalled_due, 0.0),  # aged out: an upper bound
                )
                # This thread may itself have waited for the core between reading the due
                # time and the clock: a beat that in fact ran on time is no stall.
                if lag >= self.threshold_s:
                    self.stalls += 1
                    log.warning(
                        "loop_held ms=%.0f cpu_ms=%.0f at=%s then=%s",
                        lag * 1000,
                        cpu * 1000,
                        first,
                        ",".join(then) or "-",
                    )
                stalled_due = -1.0
            if monitor._clock() - due < self.threshold_s:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:
                return
            if stalled_due != due:
                stalled_due, first, then = due, stack_line(frame, self.frames), []
            else:
                inner = stack_line(frame, 1)
                if not then or then[-1] != inner:
                    then.append(inner)


def stack_line(frame: Any, depth: int) -> str:
    """``file:line:function`` of ``frame`` and its ``depth - 1`` callers joined by ``>``,
    outermost first: the innermost frame (what runs) comes last."""
    out: list[str] = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}:{code.co_name}")
        frame = frame.f_back
    return ">".join(reversed(out))


class YoungCollections:
    """The young and middle generations collected on a clock, every ``every_s``.

    CPython starts a young collection after ``threshold`` allocations net of frees, and a
    free of an old object counts: a daemon that keeps replacing held objects (a second's
    bucket, a minute's parts) frees about as many old ones as it makes, the count stays
    low, and the young generation grows to hundreds of thousands of objects; the
    collection that finally comes takes ~0.4 us for each (at 500 pairs x 10 exchanges
    30-70 ms, and 600 ms while the retention filled; collecting only the young one on the
    clock moved the pile to the middle one, 25-56 ms each second). On a clock both find
    only what ``every_s`` made (at most 20-26 ms in the same run, one full collection of
    340 ms while the retention filled). Full collections stay CPython's."""

    def __init__(self, every_s: float, collect: Callable[[int], int] = gc.collect) -> None:
        self.every_s = every_s
        self.runs = 0
        self._collect = collect
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._handle is not None or self.every_s <= 0:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.every_s, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        self.runs += 1
        self._collect(1)
        assert self._loop is not None
        self._handle = self._loop.call_later(self.every_s, self._run)


class LoopHealth:
    """The loop-lag monitor and the GC pause timer of one running daemon, and (when
    ``stall_log_s`` > 0) the stall tracer on that monitor."""

    def __init__(
        self,
        lag: LoopLagMonitor | None = None,
        pauses: GcPauses | None = None,
        stall_log_s: float = 0.0,
        young_every_s: float = 0.0,
    ):
        self.lag = lag or LoopLagMonitor()
        self.gc = pauses or GcPauses(log_above_s=stall_log_s)
        self.stalls = StallTracer(self.lag, stall_log_s)
        self.young = YoungCollections(young_every_s)

    def start(self) -> None:
        self.lag.start()
        self.gc.install()
        self.stalls.start()
        self.young.start()

    async def aclose(self) -> None:
        """Stop measuring (safe to call twice)."""
        self.young.stop()
        self.stalls.stop()
        self.lag.stop()
        self.gc.uninstall()

    def snapshot(self) -> dict[str, Any]:
        return {"loop_lag": self.lag.snapshot(), "gc": self.gc.snapshot()}
