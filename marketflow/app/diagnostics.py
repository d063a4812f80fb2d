"""The once-a-minute pipeline diagnostics row (``pipeline_stats``, GET /diagnostics).

Nothing here runs per tick: at each minute boundary the writer reads the counters the
pipeline keeps anyway (each source's ``FeedStatus``, the aggregator's ``ticks_folded``, the
minute writer's batch durations in ``PipelineMetrics``, the queues' ``qsize()``), subtracts
the totals it read a minute before and writes one row. A Kafka consumer (issue 14) fills
``lag_by_partition``; in the ``all`` role it stays empty.

A store that is down keeps the rows in memory (the last ``max_pending``, older ones are
dropped and counted) until a later minute's write succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from marketflow.app.pipeline_metrics import percentile
from marketflow.domain.diagnostics import PipelineStatsRow, PipelineStatsStore
from marketflow.domain.errors import StoreUnavailable
from marketflow.domain.feeds import FeedStatus

log = logging.getLogger("marketflow.diagnostics")

MINUTE_MS = 60_000


def node_name(configured: str) -> str:
    """``node.id``, or the hostname when it is empty."""
    return configured or socket.gethostname()


@dataclass(frozen=True, slots=True)
class Totals:
    """Running totals read from the pipeline's own counters at one instant, per source."""

    ticks_in: Mapping[str, int] = field(default_factory=dict)
    ticks_out: int = 0
    reconnects: Mapping[str, int] = field(default_factory=dict)
    rejects: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (source, reason)


def read_totals(statuses: Iterable[FeedStatus], ticks_folded: int) -> Totals:
    """The totals now: O(sources x reasons), once a minute."""
    ticks: dict[str, int] = {}
    reconnects: dict[str, int] = {}
    rejects: dict[tuple[str, str], int] = {}
    for st in statuses:
        ticks[st.name] = st.ticks
        reconnects[st.name] = st.reconnects
        for reason, n in st.rejects.counts.items():
            rejects[(st.name, reason)] = n
    return Totals(ticks, ticks_folded, reconnects, rejects)


def _grown(now: Mapping[str, int], before: Mapping[str, int]) -> int:
    """How much the counters grew; a counter that went back (its source was restarted by a
    mode switch, with a fresh status) counts from zero."""
    return sum(n - before.get(k, 0) if n >= before.get(k, 0) else n for k, n in now.items())


def build_row(
    node_id: str,
    role: str,
    minute_ms: int,
    now: Totals,
    before: Totals,
    *,
    write_durations_s: Sequence[float] = (),
    queue_depths: Mapping[str, int] | None = None,
    lag_by_partition: Mapping[str, int] | None = None,
    written_ms: int = 0,
) -> PipelineStatsRow:
    """The row of the minute at ``minute_ms``: what grew from ``before`` to ``now``, the
    minute-row write batches of the minute (p50/p99 in ms) and the depths and lags as given."""
    rejects: dict[str, int] = {}
    for key, n in now.rejects.items():
        old = before.rejects.get(key, 0)
        grown = n - old if n >= old else n
        if grown:
            rejects[key[1]] = rejects.get(key[1], 0) + grown
    ordered = sorted(write_durations_s)
    out = now.ticks_out - before.ticks_out
    return PipelineStatsRow(
        node_id=node_id,
        role=role,
        minute_ms=minute_ms - minute_ms % MINUTE_MS,
        ticks_in=_grown(now.ticks_in, before.ticks_in),
        ticks_out=out if out >= 0 else now.ticks_out,
        reconnects=_grown(now.reconnects, before.reconnects),
        rejects=dict(sorted(rejects.items())),
        lag_by_partition=dict(lag_by_partition or {}),
        queue_depths=dict(queue_depths or {}),
        write_count=len(ordered),
        write_p50_ms=round(percentile(ordered, 0.50) * 1000, 3),
        write_p99_ms=round(percentile(ordered, 0.99) * 1000, 3),
        written_ms=written_ms,
    )


class DiagnosticsWriter:
    """Writes one ``PipelineStatsRow`` per minute boundary of ``clock`` (Unix ms).

    ``sleep`` is injected with the clock, so a test runs minutes without waiting for them.
    """

    def __init__(
        self,
        store: PipelineStatsStore,
        node_id: str,
        role: str,
        totals: Callable[[], Totals],
        queue_depths: Callable[[], Mapping[str, int]],
        write_durations: Callable[[], list[float]],
        clock: Callable[[], int],
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        max_pending: int = 60,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.role = role
        self._totals = totals
        self._queue_depths = queue_depths
        self._write_durations = write_durations
        self._clock = clock
        self._sleep = sleep
        # Consumer lag per partition, read when a row is made: the aggregate role's Kafka
        # consumer sets it (bootstrap); empty in the single-process role.
        self.lag_by_partition: Callable[[], Mapping[str, int]] = dict
        self._pending: deque[PipelineStatsRow] = deque(maxlen=max_pending)
        self._before = Totals()
        self._minute = -1
        self._task: asyncio.Task[None] | None = None
        self.rows_written = 0
        self.rows_dropped = 0
        self.last_error = ""

    def begin(self) -> None:
        """Take the baseline: the first row counts from now."""
        self._before = self._totals()
        now = self._clock()
        self._minute = now - now % MINUTE_MS

    def due(self) -> PipelineStatsRow | None:
        """The row of the minute that ended, when the clock has passed its end (else None)."""
        now = self._clock()
        if self._minute < 0:
            self.begin()
            return None
        if now < self._minute + MINUTE_MS:
            return None
        totals = self._totals()
        row = build_row(
            self.node_id,
            self.role,
            self._minute,
            totals,
            self._before,
            write_durations_s=self._write_durations(),
            queue_depths=self._queue_depths(),
            lag_by_partition=self.lag_by_partition(),
            written_ms=now,
        )
        self._before = totals
        self._minute = now - now % MINUTE_MS
        return row

    async def write_due(self) -> int:
        """Make the row that is due (if any) and write every row waiting; rows written."""
        row = self.due()
        if row is not None:
            if len(self._pending) == self._pending.maxlen:
                self.rows_dropped += 1
            self._pending.append(row)
        if not self._pending:
            return 0
        rows = list(self._pending)
        try:
            await self.store.write_stats(rows)
        except StoreUnavailable as exc:
            self.last_error = str(exc)
            log.warning("diagnostics_write_failed rows=%d error=%s", len(rows), exc)
            return 0
        self._pending.clear()
        self.rows_written += len(rows)
        self.last_error = ""
        return len(rows)

    def _delay_s(self) -> float:
        """Seconds to the next minute boundary (a little after it: the row is complete)."""
        now = self._clock()
        return (MINUTE_MS - now % MINUTE_MS) / 1000 + 0.05

    async def run(self) -> None:
        """Until cancelled: sleep to the next minute boundary, write that minute's row."""
        if self._minute < 0:
            self.begin()
        while True:
            await self._sleep(self._delay_s())
            try:
                await self.write_due()
            except Exception:  # a bug here must not stop the daemon's other work; logged
                log.exception("diagnostics_failed")

    async def start(self) -> None:
        if self._task is None:
            self.begin()
            self._task = asyncio.create_task(self.run(), name="diagnostics")

    async def aclose(self) -> None:
        """Stop the loop (the partial minute is not written); safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def status(self) -> dict[str, object]:
        return {
            "node": self.node_id,
            "role": self.role,
            "rows_written": self.rows_written,
            "rows_pending": len(self._pending),
            "rows_dropped": self.rows_dropped,
            "last_error": self.last_error or None,
        }
