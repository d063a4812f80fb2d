"""The outbox between the aggregator and the minute store.

PostgreSQL down: minute rows are kept and written when it returns; none lost or written twice.

``submit()`` never blocks the aggregator: rows wait in memory (a later version of the same
(exchange, symbol, minute) replaces an earlier one) until the background task writes them in
one ``upsert_minutes`` batch. When the store is unavailable the rows stay, the writer reports
itself down, and it retries with backoff (marketflow.backoff). Past ``max_in_memory``
pending rows, after ``spill_after_s`` of outage (before the cache would expire the seconds
the rows were made from), and at close while the store is still down, rows go to a spill file
(JSON lines, fsynced) so that even a crash loses nothing; the next start writes that file
first and deletes it only once every row in it is in the store. The store's upsert makes a
row written twice (after a crash between write and delete) count once. A spill file belongs
to one store (its name carries the store's identity): it is never drained into another one,
such as the embedded fallback when PostgreSQL is down at start.

The sources' marks travel with the rows: the newest mark per source is written in the same
store transaction as the next batch (and spilled with the rows).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from marketflow.app.pipeline_metrics import PipelineMetrics
from marketflow.backoff import Backoff
from marketflow.domain.aggregates import Mark, MinuteRow
from marketflow.domain.errors import StoreUnavailable
from marketflow.domain.ports import MinuteStore, RowSpill
from marketflow.domain.seconds_pack import pack
from marketflow.loop_slices import CHECK_EVERY, Slices

log = logging.getLogger("marketflow.minute_writer")

Clock = Callable[[], int]
"""Wall clock in Unix epoch milliseconds."""

Key = tuple[str, str, int]


class MinuteWriter:
    """Writes submitted minute rows to ``store`` at least once, in order, surviving outages."""

    def __init__(
        self,
        store: MinuteStore,
        spill: RowSpill,
        max_in_memory: int,
        clock: Clock,
        *,
        retry: Backoff | None = None,
        spill_after_s: float = 30.0,
        metrics: PipelineMetrics | None = None,
        timer: Callable[[], float] = time.perf_counter,
        on_written: Callable[[Sequence[MinuteRow]], None] | None = None,
    ) -> None:
        """``on_written``: told the rows of each batch once the store has them (the stream
        hub's ``publish_rows``); it must not block or raise."""
        self._on_written = on_written
        self.store = store
        self.spill = spill
        self._spill_after_ms = int(spill_after_s * 1000)
        self._marks: dict[str, Mark] = {}
        self._max = max(1, max_in_memory)
        self._clock = clock
        # Default: 0.25 s doubling up to 4 s between attempts while the store is down.
        self._retry = retry or Backoff(0.25, 4.0, random.Random())
        self._retry_in_s = 0.0
        self._pending: dict[Key, MinuteRow] = {}
        self._spill_exists = False  # True from the first append until the file is deleted
        self._spilled = 0
        self._written = 0
        self._state = "up"
        self._last_error: str | None = None
        self._down_since_ms: int | None = None
        # flush(): every submit() has a sequence number; once an attempt that began after
        # submit n succeeds (spill file included), rows of submits <= n are in the store.
        self._submitted = 0
        self._durable = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flush_requested = False
        self._wake = asyncio.Event()  # new rows
        self._nudge = asyncio.Event()  # cut a backoff short: flush, close, or memory full
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._finished = False  # aclose() done: late rows go straight to the spill file
        # Duration of each successful write batch (``minute_write`` histogram).
        self.metrics = metrics if metrics is not None else PipelineMetrics()
        self._timer = timer

    # -- the aggregator's side ------------------------------------------------------------

    def submit(self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None) -> None:
        """Queue rows (and the marks they reflect) for writing; never blocks, never raises
        for the store's sake."""
        if not rows and not marks:
            return
        if self._finished:
            log.error("minute_rows_after_close rows=%d action=spill", len(rows))
            self.spill.append(list(rows), dict(marks or {}))
            self._spill_exists = True
            self._spilled += len(rows)
            return
        for row in rows:
            self._pending[row.key] = row
        for source, mark in (marks or {}).items():
            held = self._marks.get(source)
            if held is None or held[1] <= mark[1]:
                self._marks[source] = mark
        self._submitted += 1
        self._wake.set()
        if len(self._pending) > self._max:
            self._nudge.set()

    async def flush(self) -> None:
        """Wait until every row submitted so far is in the store.

        Triggers an attempt now (skipping any backoff); raises StoreUnavailable if it fails.
        """
        target = self._submitted
        if (
            self._durable >= target
            and not self._pending
            and not self._marks
            and not self._spill_exists
        ):
            return
        if self._finished:
            raise StoreUnavailable(f"minute writer closed; {self._spilled} rows in spill file")
        if self._task is None:
            raise RuntimeError("MinuteWriter.flush() needs start() first")
        if self._task.done() and not self._closed:
            raise StoreUnavailable("minute writer stopped")  # nothing would ever answer
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._flush_requested = True
        self._nudge.set()
        self._wake.set()
        try:
            await fut
        finally:
            self._waiters = [(t, f) for t, f in self._waiters if f is not fut]

    def status(self) -> dict[str, Any]:
        """The /health view of the writer and its store."""
        return {
            "state": self._state,
            "kind": self.store.kind,
            "spill_path": str(self.spill.path),
            "pending_rows": len(self._pending),
            "spilled_rows": self._spilled,
            "written_rows": self._written,
            "last_error": self._last_error,
            "down_since_ms": self._down_since_ms,
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Write a spill file left by an earlier run (one attempt), then run in the background.

        Writing the spill first means rows the aggregator restores from the store at start
        include those rows. A store still down leaves the file for the background task.
        """
        if self._task is not None:
            return
        if await asyncio.to_thread(self.spill.exists):
            self._spill_exists = True
            self._spilled = await asyncio.to_thread(self.spill.count)
            log.warning("minute_spill_found path=%s rows=%d", self.spill.path, self._spilled)
            await self._attempt()
        self._task = asyncio.create_task(self._run(), name="minute-writer")

    async def _run(self) -> None:
        """``_serve()``; a flush waiting when this task dies fails instead of waiting for ever."""
        try:
            await self._serve()
        except BaseException as exc:
            self._fail_waiters(StoreUnavailable(f"minute writer stopped: {type(exc).__name__}"))
            raise

    async def _serve(self) -> None:
        """Write pending rows until ``aclose()``; retry with backoff while the store is down."""
        while not self._closed:
            if not (self._pending or self._marks or self._spill_exists or self._flush_requested):
                self._wake.clear()
                await self._wake.wait()
                continue
            if await self._attempt():
                continue
            delay = self._retry_in_s
            log.warning(
                "minute_store_down kind=%s attempt=%d pending=%d spilled=%d "
                "retry_in_s=%.2f error=%s",
                self.store.kind,
                self._retry.failures,
                len(self._pending),
                self._spilled,
                delay,
                self._last_error,
            )
            await self._backoff(delay)

    async def aclose(self) -> None:
        """Stop the task, make a last write attempt, spill what is left; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._nudge.set()
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending or self._marks or self._spill_exists:
            await self._attempt()
        # Whatever is left (the store still down, or rows submitted during that last write)
        # goes to the spill file; nothing left is nothing to do.
        await self._spill_pending()
        self._finished = True
        if self._pending:
            log.error("minute_rows_lost rows=%d reason=spill_failed", len(self._pending))
        self._fail_waiters(StoreUnavailable("minute writer closed"))

    # -- internals ------------------------------------------------------------------------

    async def _attempt(self) -> bool:
        """One write of the spill file then the pending rows. True when all of it landed."""
        target = self._submitted
        self._flush_requested = False
        try:
            if self._spill_exists:
                await self._drain_spill()
            batch, self._pending = self._pending, {}
            marks, self._marks = self._marks, {}
            if batch or marks:
                try:
                    await self._timed_upsert(list(batch.values()), marks)
                except BaseException:
                    # Rows submitted meanwhile are newer versions: they win over the batch.
                    batch.update(self._pending)
                    self._pending = batch
                    marks.update(self._marks)
                    self._marks = marks
                    raise
                self._written += len(batch)
                if batch and self._on_written is not None:
                    self._on_written(list(batch.values()))
        except StoreUnavailable as exc:
            self._mark_down(str(exc))
            self._fail_waiters(exc)
            return False
        except Exception as exc:
            # Not an outage we know: keep the rows (they are retried and, past the memory
            # bound, spilled) rather than lose them to a bug; the log has the traceback.
            log.exception("minute_write_failed kind=%s", self.store.kind)
            error = f"{type(exc).__name__}: {exc}"
            self._mark_down(error)
            self._fail_waiters(StoreUnavailable(error))
            return False
        self._mark_up()
        self._durable = max(self._durable, target)
        for t, fut in self._waiters:
            if t <= self._durable and not fut.done():
                fut.set_result(None)
        return True

    async def _timed_upsert(self, rows: list[MinuteRow], marks: Mapping[str, Mark]) -> None:
        """One write batch; its duration is observed when it succeeds (a failure's duration
        says more about the timeout than about the store)."""
        rows = await packed(rows)  # before the clock: the figure is the store's
        started = self._timer()
        await self.store.upsert_minutes(rows, marks)
        self.metrics.minute_written(self._timer() - started)

    async def _drain_spill(self) -> None:
        """Write the spill file in order, in chunks of ``max_in_memory`` rows, then delete it."""
        offset = 0
        while True:
            rows, marks, offset = await asyncio.to_thread(self.spill.read_chunk, offset, self._max)
            if not rows and not marks:
                break
            await self._timed_upsert(rows, marks)
            self._written += len(rows)
            if rows and self._on_written is not None:
                self._on_written(rows)
        await asyncio.to_thread(self.spill.remove)
        log.info("minute_spill_written path=%s rows=%d", self.spill.path, self._spilled)
        self._spill_exists = False
        self._spilled = 0

    async def _spill_pending(self) -> None:
        """Move every pending row to the spill file (kept in memory if the file fails)."""
        rows = list(self._pending.values())
        marks = dict(self._marks)
        if not rows and not marks:
            return
        self._spill_exists = True  # set first: a cancelled append may still land in the file
        try:
            await asyncio.to_thread(self.spill.append, rows, marks)
        except OSError as exc:
            # Rows stay in memory; the OS error says it all, a traceback would not help.
            log.error(  # noqa: TRY400
                "minute_spill_failed path=%s rows=%d error=%s", self.spill.path, len(rows), exc
            )
            return
        for row in rows:
            # A newer version submitted during the append stays pending (written after).
            if self._pending.get(row.key) is row:
                del self._pending[row.key]
        for source, mark in marks.items():
            if self._marks.get(source) == mark:
                del self._marks[source]
        self._spilled += len(rows)
        log.warning(
            "minute_rows_spilled path=%s rows=%d total_spilled=%d",
            self.spill.path,
            len(rows),
            self._spilled,
        )

    async def _backoff(self, delay: float) -> None:
        """Sleep ``delay`` unless flushed or closed; spill whenever memory is over the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while True:
            # Clear first, check after: a nudge (flush, close) that comes while a spill is
            # being written is then seen, not cleared away unread.
            self._nudge.clear()
            if self._closed or self._flush_requested:
                return
            if len(self._pending) > self._max or self._down_too_long():
                await self._spill_pending()  # a nudge meanwhile stays set: the wait sees it
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._nudge.wait()
            except TimeoutError:
                return

    def _down_too_long(self) -> bool:
        """Down for longer than the cache keeps the seconds these rows were made from."""
        since = self._down_since_ms
        return bool(self._pending or self._marks) and (
            since is not None and self._clock() - since >= self._spill_after_ms
        )

    def _mark_down(self, error: str) -> None:
        # Every failed attempt counts (also those of start and close) towards the next delay.
        self._retry_in_s = self._retry.fail()
        self._last_error = error
        if self._state != "down":
            self._state = "down"
            self._down_since_ms = self._clock()

    def _mark_up(self) -> None:
        if self._state == "down":
            log.info(
                "minute_store_up kind=%s after_attempts=%d written=%d",
                self.store.kind,
                self._retry.failures,
                self._written,
            )
        self._state = "up"
        self._retry.reset()
        self._down_since_ms = None

    def _fail_waiters(self, exc: StoreUnavailable) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)


async def packed(rows: list[MinuteRow]) -> list[MinuteRow]:
    """``rows`` with their seconds packed for the store (``MinuteRow.packed``), in slices of
    the loop: a backfill closes 50,000 minutes at once at 500 pairs x 10 exchanges, and the
    store packing 3 million seconds in one go held the loop for 200-600 ms."""
    slices = Slices()
    out = rows
    for i, row in enumerate(rows):
        if row.seconds is not None and row.packed is None:
            if out is rows:
                out = list(rows)
            out[i] = dataclasses.replace(row, packed=pack(row.minute_ms // 1000, row.seconds))
        if i % CHECK_EVERY == 0 and slices.spent():
            await slices.pause()
    return out
