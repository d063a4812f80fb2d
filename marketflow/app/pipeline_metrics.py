"""Latency and volume figures of the pipeline, recorded per flush, per write batch or per
batch, never per tick (a tick's budget is about a microsecond).

- ``tick_to_cache``: per cache write and source, from the receipt of the oldest tick batch
  folded since the previous write to the cache acknowledging this one: the longest any tick
  of the flush waited before a reader could see it in the cache (a tick received later
  waited less). The aggregator keeps that oldest receipt per source per batch (one compare);
  while the cache is down it is kept, so the write after the outage observes the outage.
- ``minute_write``: the duration of one successful minute-row write batch (``MinuteWriter``);
  the diagnostics row (app/diagnostics.py) takes the minute's durations for its p50/p99.
- ``book_updates``: top-of-book updates folded, per venue (``TickBatch.books`` per batch).

``/metrics`` exports the histograms (``entrypoints/metrics.py``); ``/health`` shows p50/p99 of
the recent tick -> cache latencies (``recent_summary``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from marketflow.app.loop_health import Histogram

# Receipt -> cache write: a flush every 10-1000 ms, a write of a few ms; seconds mean trouble.
TICK_TO_CACHE_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# One upsert batch of minute rows: milliseconds on a healthy database.
MINUTE_WRITE_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank); 0 when there are none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RecentSummary:
    """p50/p99/max of the last ``keep`` observations, sorted at most once per
    ``every_s`` (a /health poll must not sort thousands of floats each time)."""

    def __init__(
        self, keep: int = 4096, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.values: deque[float] = deque(maxlen=keep)
        self._every_s = every_s
        self._clock = clock
        self._cached: tuple[float, dict[str, Any]] | None = None

    def summary(self) -> dict[str, Any]:
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < self._every_s:
            return self._cached[1]
        ordered = sorted(self.values)
        doc = {
            "n": len(ordered),
            "p50_ms": round(percentile(ordered, 0.50) * 1000, 1),
            "p99_ms": round(percentile(ordered, 0.99) * 1000, 1),
            "max_ms": round((ordered[-1] if ordered else 0.0) * 1000, 1),
        }
        self._cached = (now, doc)
        return doc


class PipelineMetrics:
    """The aggregator's and the minute writer's histograms and counters (see module doc)."""

    def __init__(self) -> None:
        self.tick_to_cache: dict[str, Histogram] = {}  # source -> histogram
        self.recent_tick_to_cache = RecentSummary()
        self.minute_write = Histogram(MINUTE_WRITE_BUCKETS_S)
        self.book_updates: dict[str, int] = {}  # venue -> updates folded
        # Minute-write durations since the diagnostics row last took them (app/diagnostics.py):
        # one float per write batch, bounded should nobody take them.
        self.minute_writes_unread: deque[float] = deque(maxlen=4096)
        # The aggregate role: bad tick records per reason (the Kafka consumer's counts, shared)
        self.bad_records: dict[str, int] | None = None

    def minute_written(self, seconds: float) -> None:
        """One successful minute-row write batch took ``seconds``."""
        self.minute_write.observe(seconds)
        self.minute_writes_unread.append(seconds)

    def take_minute_writes(self) -> list[float]:
        """The write durations observed since the last call (the diagnostics row's)."""
        taken = list(self.minute_writes_unread)
        self.minute_writes_unread.clear()
        return taken

    def cache_written(self, oldest_received: Mapping[str, int], written_ms: int) -> None:
        """A cache write acknowledged at ``written_ms`` (wall clock) carried the ticks of each
        source received since ``oldest_received[source]``: one observation per source."""
        hists = self.tick_to_cache
        recent = self.recent_tick_to_cache.values
        for source, received_ms in oldest_received.items():
            h = hists.get(source)
            if h is None:
                h = hists[source] = Histogram(TICK_TO_CACHE_BUCKETS_S)
            age = max(0, written_ms - received_ms) / 1000
            h.observe(age)
            recent.append(age)

    def books_folded(self, venue: str, n: int) -> None:
        self.book_updates[venue] = self.book_updates.get(venue, 0) + n

    def snapshot(self) -> dict[str, Any]:
        """The /health ``pipeline`` additions: recent tick -> cache latency percentiles."""
        return {"tick_to_cache_ms": self.recent_tick_to_cache.summary()}
