"""Where ticks become windows, cached prices and minute rows.

The aggregator owns every PairWindow. One task folds batches from the fan-in queue into
per-second buckets (pure in-memory work, no I/O); another flushes once per flush interval:
changed latest prices and changed seconds go to the cache in one round trip, closed minutes go
to the minute writer in one batch. Redis and PostgreSQL therefore see work proportional to
pairs x exchanges, never to the tick rate.

Each flush also carries the sources' resume positions (``TickBatch.mark``) with the state
they produced: into the same cache transaction as the seconds and, with the minute rows, into
the same store transaction. A restart (see ``restore.py``) rebuilds the windows from both and
resumes each source from the newest durable position, so nothing durable is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol

from marketflow.app.pipeline_metrics import PipelineMetrics
from marketflow.app.restore import restore
from marketflow.backoff import Backoff
from marketflow.domain.aggregates import LatestPrice, Mark, MinuteRow, SecondRow
from marketflow.domain.errors import CacheUnavailable
from marketflow.domain.ports import MinuteStore, PriceCache
from marketflow.domain.seconds_snapshot import SecondsSnapshot
from marketflow.domain.ticks import BookUpdate, TickBatch
from marketflow.domain.window import PairWindow
from marketflow.loop_slices import CHECK_EVERY, SLICE_S, Slices
from marketflow.settings import PipelineSettings

log = logging.getLogger("marketflow.aggregator")

FOLD_SLICE_S = 0.002  # the consumer yields to the loop after this much folding
FLUSH_SLICE_S = SLICE_S  # a flush's build yields to the loop after this much (loop_slices)
BEHIND_FACTOR = 8  # a daemon behind its feeds spends at most ~1/9 of its loop building flushes
FULL_SWEEP_MS = 10_000  # every window is visited at least this often (see Aggregator._sweep)
# Seconds a cache that failed or is down may owe before a refill replaces the backlog (see
# Aggregator._keep_unwritten): a refill rewrites everything held, staged, and costs ~1 s of
# Redis per 250,000 seconds; a backlog this size is one script of ~0.1 s.
UNWRITTEN_LIMIT = 50_000

Clock = Callable[[], int]


class FlushBuild(NamedTuple):
    """What one flush writes, taken at clock ``now``, with the fold receipts and marks."""

    now: int
    latest: list[LatestPrice]
    seconds: list[SecondRow]
    received: dict[str, int]  # source -> receipt of its oldest batch folded since the last
    rows: list[MinuteRow]
    marks: dict[str, Mark]  # the positions this flush took (the marks it carries)


class RowSink(Protocol):
    """Takes closed minute rows (the MinuteWriter outbox), with the marks they reflect."""

    def submit(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None: ...


def _no_backlog() -> bool:
    return False


def _no_sources() -> Iterable[str]:
    return ()


class Aggregator:
    """Folds tick batches into windows; flushes the cache and minute rows periodically."""

    def __init__(
        self,
        fanin: asyncio.Queue[TickBatch],
        cache: PriceCache,
        rows: RowSink,
        pipeline: PipelineSettings,
        clock: Clock,
        *,
        healthy_sources: Callable[[], Iterable[str]] = _no_sources,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: PipelineMetrics | None = None,
        on_latest: Callable[[Sequence[LatestPrice]], None] | None = None,
    ) -> None:
        """``on_latest``: told the latest prices changed by each flush, once per flush (the
        stream hub's ``publish_latest``); it must not block or raise."""
        self._fanin = fanin
        self._cache = cache
        self._rows = rows
        self._pipeline = pipeline
        self._clock = clock
        self._healthy = healthy_sources
        self.windows: dict[str, dict[str, PairWindow]] = {}
        self.books: dict[tuple[str, str], BookUpdate] = {}
        # source -> (position, made_ms): folded positions; made_ms is the flush that took it
        self.marks: dict[str, Mark] = {}
        self._positions: dict[str, int] = {}
        # exchange -> minute_ms (wall time) -> ms the source was up while we ran
        self.coverage: dict[str, dict[int, int]] = {}
        self._covered_until = clock()
        self.floor_second = 0  # nothing older is accepted (set by a restore)
        self.ticks_folded = 0
        self.queue_delay_ms = 0  # receipt -> fold of the last batch: time spent in queues
        self._delay_peak_ms = 0
        self.queue_delay_peak_ms = 0  # the highest over the last flush interval
        self.flush_duration_ms = 0
        self.cache_up = True
        self.cache_error = ""
        self._cache_retry_at = 0
        self._cache_backoff = Backoff(1.0, 5.0, rng or random.Random())
        self._refill = False
        # What the cache was not given while it failed or was down, newest value per key:
        # written with the next write that gets through (whole seconds and newest-wins latest
        # prices: writing a superseded one again changes nothing), never by a refill.
        self._unwritten: dict[tuple[str, str, int], SecondRow] = {}
        self._unwritten_latest: dict[tuple[str, str], LatestPrice] = {}
        # False until a write got through or a restore seeded windows: before, everything
        # held was in the write being made, and a cache found empty by it needs no refill.
        self._held_beyond_write = False
        self.flushes = 0
        self._changed: set[PairWindow] = set()  # windows folded into since the last flush
        self._due: dict[int, set[PairWindow]] = {}  # minute_ms -> windows it became pending in
        # clock ms -> windows with a rewrite postponed to then (window.REWRITE_GAP_MS)
        self._retry: dict[int, set[PairWindow]] = {}
        self._next_full_sweep = 0
        self.flush_build_s = 0.0  # the last flush's CPU before it awaited the cache
        self._folded = asyncio.Event()  # set when the consumer has emptied the fan-in queue
        # True while chunks wait to be parsed (the ingest's parse gate): not idle then, so the
        # flusher coalesces up to its ceiling instead of flushing after every parse.
        self.parse_backlog: Callable[[], bool] = _no_backlog
        self._next_sweep = 0  # the flusher's next minute sweep (clock ms)
        self._sleep = sleep
        # The world view's inputs (app/world_view.py): each batch's book updates, and each
        # flush (it reads the feeds' link states then). Per batch and per flush, never per tick.
        self.on_books: Callable[[list[BookUpdate]], None] | None = None
        self.on_flush: Callable[[int], None] | None = None
        # Latency histograms and book counts: recorded per flush and per batch, never per tick.
        self.metrics = metrics if metrics is not None else PipelineMetrics()
        # source -> receipt of the oldest tick batch folded since the last cache write
        self._first_received: dict[str, int] = {}
        self._on_latest = on_latest
        # Told the marks each acknowledged cache write carried (the Kafka consumer commits
        # the partitions' offsets after them); must not block or raise.
        self.on_flushed: Callable[[Mapping[str, Mark]], None] | None = None
        self._flush_lock = asyncio.Lock()
        # Cleared while a flush builds what it writes in slices (yielding to the loop): the
        # consumer folds nothing meanwhile, so the flush is one state with the marks it takes.
        self._fold_open = asyncio.Event()
        self._fold_open.set()

    @property
    def cache_kind(self) -> str:
        return self._cache.kind

    # -- folding ---------------------------------------------------------------------------

    def fold(self, batch: TickBatch) -> None:
        if batch.by_symbol or batch.folded:
            self._fold_ticks(batch)
        if batch.books:
            self._fold_books(batch)
        if batch.mark is not None:
            self._positions[batch.mark_source or batch.exchange] = batch.mark
        self.ticks_folded += batch.count
        if batch.count:  # per batch: the flush observes tick -> cache from it
            first = self._first_received.get(batch.exchange)
            if first is None or batch.received_ms < first:
                self._first_received[batch.exchange] = batch.received_ms
        delay = self._clock() - batch.received_ms
        self.queue_delay_ms = delay
        if delay > self._delay_peak_ms:
            self._delay_peak_ms = delay

    def _fold_ticks(self, batch: TickBatch) -> None:
        pairs = self.windows.get(batch.exchange)
        if pairs is None:
            pairs = self.windows[batch.exchange] = {}
        changed = self._changed
        for symbol, points in batch.by_symbol.items():
            w = pairs.get(symbol)
            if w is None:
                w = pairs[symbol] = PairWindow(batch.exchange, symbol, self.floor_second)
            w.add(points, batch.received_ms)
            changed.add(w)
        for (symbol, second), f in batch.folded.items():
            w = pairs.get(symbol)
            if w is None:
                w = pairs[symbol] = PairWindow(batch.exchange, symbol, self.floor_second)
            w.add_second(second, f, batch.received_ms)
            changed.add(w)

    def _fold_books(self, batch: TickBatch) -> None:
        """A batch's top-of-book updates: kept, counted per venue, handed to the world view."""
        for book in batch.books:
            self.books[(book.exchange, book.symbol)] = book
        self.metrics.books_folded(batch.exchange, len(batch.books))
        if self.on_books is not None:
            self.on_books(batch.books)

    async def consume(self) -> None:
        """Fold batches as they arrive, draining whatever is queued per wake-up, but letting
        the loop run (HTTP requests, reads) every ``FOLD_SLICE_S`` of folding: a backlog of
        a thousand batches is folded in slices, not in one 100 ms step."""
        queue = self._fanin
        open_ = self._fold_open
        while True:
            batch = await queue.get()
            slices = Slices(FOLD_SLICE_S)
            while True:
                try:  # a batch that fails is still done: stop() joins on this queue
                    if not open_.is_set():  # a flush is building (see _flush)
                        await open_.wait()
                    self.fold(batch)
                finally:
                    queue.task_done()
                if slices.spent():
                    await slices.pause()
                if queue.empty():
                    break
                batch = queue.get_nowait()
            if not self.parse_backlog():
                self._folded.set()  # idle: the flusher may write what was folded

    def drain(self) -> int:
        """Fold what is queued without waiting (the consumer task is gone); returns batches."""
        n = 0
        while not self._fanin.empty():
            batch = self._fanin.get_nowait()
            try:
                self.fold(batch)
            except Exception:
                log.exception("fold_failed exchange=%s ticks=%d", batch.exchange, batch.count)
            finally:
                self._fanin.task_done()
            n += 1
        return n

    def window(self, exchange: str, symbol: str) -> PairWindow | None:
        pairs = self.windows.get(exchange)
        return None if pairs is None else pairs.get(symbol)

    def all_windows(self) -> Iterator[PairWindow]:
        for pairs in self.windows.values():
            yield from pairs.values()

    def window_for(self, exchange: str, symbol: str) -> PairWindow:
        pairs = self.windows.setdefault(exchange, {})
        w = pairs.get(symbol)
        if w is None:
            w = pairs[symbol] = PairWindow(exchange, symbol, self.floor_second)
        return w

    def position(self, source: str) -> int | None:
        """The newest folded resume position of ``source`` (where a new reader starts)."""
        pos = self._positions.get(source)
        if pos is not None:
            return pos
        mark = self.marks.get(source)
        return None if mark is None else mark[0]

    def restore_position(self, source: str, mark: Mark) -> None:
        self.marks[source] = mark

    async def resume(
        self,
        store: MinuteStore,
        owns: Callable[[str], bool] | None = None,
        sources: Callable[[str], bool] | None = None,
    ) -> None:
        """Rebuild the windows from the cache and the store after a restart (restore.py);
        ``owns``/``sources``: only those symbols and marks (a Kafka node taking partitions
        over)."""
        retention = self._pipeline.window_retention_s
        async with self._flush_lock:  # the restore yields to the loop: no flush meanwhile
            await restore(self, self._cache, store, retention, owns=owns, sources=sources)
            if self.windows:
                self._held_beyond_write = True

    def drop(self, owns: Callable[[str], bool], sources: Iterable[str]) -> int:
        """Forget the windows and books of the symbols ``owns`` accepts and the marks of
        ``sources`` (partitions another node takes over: flushed first, see
        app/partitions.py). Nothing of them is written by this node afterwards. Returns the
        windows dropped."""
        dropped: set[PairWindow] = set()
        for pairs in self.windows.values():
            for symbol in [s for s in pairs if owns(s)]:
                dropped.add(pairs.pop(symbol))
        self._changed -= dropped
        for table in (self._due, self._retry):
            for minute, ws in list(table.items()):
                ws -= dropped
                if not ws:
                    del table[minute]
        for key in [k for k in self.books if owns(k[1])]:
            del self.books[key]
        # Not ours to write any more: the node taking the pairs over writes them from now on.
        for owed in [k for k in self._unwritten if owns(k[1])]:
            del self._unwritten[owed]
        for owed_latest in [k for k in self._unwritten_latest if owns(k[1])]:
            del self._unwritten_latest[owed_latest]
        for source in sources:
            self.marks.pop(source, None)
            self._positions.pop(source, None)
        return len(dropped)

    # -- coverage ----------------------------------------------------------------------------

    def _cover(self, now: int) -> None:
        """Credit the time since the last flush to the minutes of every healthy source."""
        start, self._covered_until = self._covered_until, now
        if now <= start:
            return
        for ex in self._healthy():
            minutes = self.coverage.setdefault(ex, {})
            t = start
            while t < now:
                minute = t // 60_000 * 60_000
                end = min(now, minute + 60_000)
                minutes[minute] = minutes.get(minute, 0) + (end - t)
                t = end

    def covered_ms(self, exchange: str, minute_ms: int) -> int:
        return min(60_000, self.coverage.get(exchange, {}).get(minute_ms, 0))

    def _evict_coverage(self) -> None:
        floor_ms = (self._covered_until // 1000 - self._pipeline.window_retention_s - 120) * 1000
        for minutes in self.coverage.values():
            for m in [m for m in minutes if m < floor_ms]:
                del minutes[m]

    # -- flushing ----------------------------------------------------------------------------

    async def run_flusher(self) -> None:
        """Flush as soon as the consumer has folded everything queued (the loop is idle).

        Under load one flush carries every batch folded meanwhile (``flush_step``), and the
        next waits ``coalesce_wait_s``; never longer than ``flush_interval_ms``, the ceiling
        of what a crash can lose. Minutes are closed on the ceiling's cadence (``_sweep``);
        a cache flush visits only the changed windows."""
        while True:
            await self.flush_step()

    async def flush_step(self) -> None:
        """One turn of the flusher: wait until the queue is drained (at most the ceiling),
        flush, sweep closed minutes when a ceiling has passed since the last sweep, then
        let batches coalesce for ``coalesce_wait_s``."""
        p = self._pipeline
        try:
            async with asyncio.timeout(p.flush_interval_ms / 1000):
                await self._folded.wait()
        except TimeoutError:
            pass
        self._folded.clear()
        now = self._clock()
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + p.flush_interval_ms
        await self.flush(sweep=sweep)
        wait = self.coalesce_wait_s()
        if wait > 0:
            await self._sleep(wait)

    def coalesce_wait_s(self) -> float:
        """Seconds between a flush and the next: at least ``flush_min_interval_ms``, and
        twice the CPU the last flush took before awaiting the cache (it grows with the
        windows changed, not with the round trip, so building flushes takes at most a third
        of the loop with many pairs), but never past the ceiling ``flush_interval_ms``.

        Behind (batches waited in the queues longer than the ceiling), ``BEHIND_FACTOR``
        times that CPU: a flush then costs about as much whether it carries one tick per
        changed second or twenty, ticks wait in the queues anyway, and the CPU goes to
        catching up. The ceiling still holds, so the crash-loss bound only grows by what the
        queues already add."""
        p = self._pipeline
        gap = p.flush_min_interval_ms / 1000
        factor = BEHIND_FACTOR if self.queue_delay_peak_ms > p.flush_interval_ms else 2
        return min(max(gap, factor * self.flush_build_s), p.flush_interval_ms / 1000)

    async def flush(self, *, final: bool = False, sweep: bool = True) -> None:
        """Push changes to the cache and, with ``sweep``, closed (or, when final, all) minutes
        to the writer. One at a time: a flush asked for by a partition handover
        (app/partitions.py) must not race the flusher's (two writes of one second could land
        in the wrong order)."""
        async with self._flush_lock:
            await self._flush(final=final, sweep=sweep)

    async def _flush(self, *, final: bool, sweep: bool) -> None:
        slices = Slices(FLUSH_SLICE_S, finish_on_cancel=True)
        self._fold_open.clear()
        try:
            built = await self._build(final, sweep, slices)
        finally:
            self._fold_open.set()
        self.flush_build_s = slices.done()
        now, latest, seconds = built.now, built.latest, built.seconds
        cancelled = slices.cancelled
        written = False
        if not cancelled:
            try:
                written = await self._write_cache(latest, seconds, built.marks, now, force=final)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:  # stopping: what this flush took is owed to the final flush
            self._keep_unwritten(latest, seconds)
        if built.rows or final:
            # After the cache write: a mark reaches the store only once the cache holds the
            # open minutes' seconds it covers (a crash between the two writes would otherwise
            # resume past ticks of the open minute that only this process held).
            self._rows.submit(built.rows, dict(self.marks))
        if written:
            self._written(built.received, built.marks)
        else:  # not written (cache down): those ticks wait on, counted from their receipt
            for source, ms in built.received.items():
                if ms < self._first_received.get(source, ms + 1):
                    self._first_received[source] = ms
        self.queue_delay_peak_ms, self._delay_peak_ms = self._delay_peak_ms, 0
        self.flush_duration_ms = self._clock() - now
        self.flushes += 1
        if cancelled:
            raise asyncio.CancelledError

    async def _build(self, final: bool, sweep: bool, slices: Slices) -> FlushBuild:
        """What a flush writes, taken from the windows in slices of the loop (nothing is
        folded meanwhile: see ``_fold_open``): changed latest prices and seconds, the
        receipts they were folded from, closed minute rows (``sweep``) and the marks."""
        now = self._clock()
        if self.on_flush is not None:
            self.on_flush(now)
        self._cover(now)
        latest: list[LatestPrice] = []
        seconds: list[SecondRow] = []
        due = self._due
        newly: list[int] = []
        retention = self._pipeline.window_retention_s
        changed_windows = list(self._changed)
        self._changed.clear()
        received, self._first_received = self._first_received, {}
        for i, w in enumerate(changed_windows, 1):
            w.active_ms = now
            if w.dirty_seconds:
                lp = w.latest()
                if lp is not None:
                    latest.append(lp)
                seconds.extend(w.take_dirty_seconds(newly))
                for minute in newly:
                    got = due.get(minute)
                    if got is None:
                        due[minute] = {w}
                    else:
                        got.add(w)
                newly.clear()
            w.evict(retention)  # the floor follows the newest second at once: late is late
            if i % CHECK_EVERY == 0 and slices.spent():
                await slices.pause()
        if latest and self._on_latest is not None:
            self._on_latest(latest)  # once per flush, never per tick
        rows = await self._sweep(now, final, slices) if sweep or final else []
        changed = {source: (pos, now) for source, pos in self._positions.items()}
        self.marks.update(changed)
        self._positions.clear()
        return FlushBuild(now, latest, seconds, received, rows, changed)

    def _written(self, received: dict[str, int], marks: dict[str, Mark]) -> None:
        """The cache acknowledged a flush: latency observed, marks' listener told."""
        self.metrics.cache_written(received, self._clock())
        if self.on_flushed is not None and marks:
            self.on_flushed(marks)

    async def _sweep(self, now: int, final: bool, slices: Slices) -> list[MinuteRow]:
        """Closed minutes (all pending ones when final) and eviction.

        Only windows with a pending minute that has closed are visited (``_due``: windows
        by the minute they gained pending), so a sweep costs what closes, not one visit of
        every window; every ``FULL_SWEEP_MS`` all windows are visited, for minutes made
        pending by a restore, exchange clocks ahead of ours, and windows gone quiet."""
        p = self._pipeline
        grace = p.minute_grace_ms
        full = final or now >= self._next_full_sweep
        closed = [m for m in self._due if m + 60_000 + grace <= now]
        visit: Iterable[PairWindow]
        if full:
            self._next_full_sweep = now + FULL_SWEEP_MS
            visit = list(self.all_windows())
            for m in closed:
                del self._due[m]
            self._retry.clear()
            self._evict_coverage()
        else:
            picked: set[PairWindow] = set()
            for m in closed:
                picked.update(self._due.pop(m))
            for t in [t for t in self._retry if t <= now]:
                picked.update(self._retry.pop(t))
            visit = picked
        rows: list[MinuteRow] = []
        postponed: list[int] = []
        for i, w in enumerate(visit, 1):
            if i % CHECK_EVERY == 0 and slices.spent():
                await slices.pause()
            covered = self.coverage.get(w.exchange, {})
            if final:
                rows.extend(w.open_minutes(covered))
            else:
                rows.extend(w.closed_minutes(now, grace, covered, postponed))
                if postponed:  # back once the gap has passed
                    self._retry.setdefault(min(postponed), set()).add(w)
                    postponed.clear()
            w.evict(p.window_retention_s)
        return rows

    async def _write_cache(
        self,
        latest: list[LatestPrice],
        seconds: Collection[SecondRow],
        marks: dict[str, Mark],
        now: int,
        *,
        force: bool,
    ) -> bool:
        """True when the cache acknowledged a write of (at least) ``latest``."""
        if not self.cache_up and now < self._cache_retry_at and not force:
            self._keep_unwritten(latest, seconds)
            return False
        refill = self._refill
        if refill:
            # The cache lost its data (restarted, flushed) or owes too much: refill everything.
            latest = [lp for w in self.all_windows() if (lp := w.latest()) is not None]
            seconds = SecondsSnapshot(w.capture() for w in self.all_windows())
            marks = dict(self.marks)
        elif self._unwritten or self._unwritten_latest:
            # Owed since a failed write: the marks they go with are among self.marks.
            self._keep_unwritten(latest, seconds)
            latest = list(self._unwritten_latest.values())
            seconds = list(self._unwritten.values())
            marks = dict(self.marks)
        if not latest and not seconds and not marks:
            return False
        try:
            lost = await self._cache.write(latest, seconds, marks, whole=refill)
        except CacheUnavailable as exc:
            if self.cache_up:
                log.warning("cache_down kind=%s error=%s", self._cache.kind, exc)
            self.cache_up = False
            self.cache_error = str(exc)
            self._cache_retry_at = now + int(self._cache_backoff.fail() * 1000)
            if not refill:
                self._keep_unwritten(latest, seconds)
            return False
        self._unwritten.clear()
        self._unwritten_latest.clear()
        if refill:
            log.info("cache_refilled kind=%s seconds=%d", self._cache.kind, len(seconds))
        # A refill that finds the cache emptied has just put everything back: no second one;
        # nor the first write of a daemon that restored nothing (an empty Redis at start).
        self._refill = bool(lost) and not refill and self._held_beyond_write
        self._held_beyond_write = True
        if self._refill:
            log.warning("cache_lost_data kind=%s action=refill", self._cache.kind)
        self.cache_up = True
        self.cache_error = ""
        self._cache_backoff.reset()
        return True

    def _keep_unwritten(
        self, latest: Sequence[LatestPrice], seconds: Collection[SecondRow]
    ) -> None:
        """Owe the cache what a failed or skipped write carried, so that a cache that comes
        back with its data (a timeout, a dropped connection, a restart that kept its AOF: the
        write script's sentinel tells) gets only what it missed, not a refill of everything
        held: at 500 pairs x 10 exchanges that is millions of seconds and seconds of Redis,
        long enough for the next write to time out and start it all over. A cache that lost
        its data is refilled (``_refill``), and so is one that owes more than
        ``UNWRITTEN_LIMIT`` seconds; then nothing is owed."""
        if self._refill:
            return
        owed = self._unwritten
        if len(owed) + len(seconds) > UNWRITTEN_LIMIT:
            self._refill = True
            owed.clear()
            self._unwritten_latest.clear()
            return
        for b in seconds:
            owed[(b[0], b[1], b[2])] = b
        owed_latest = self._unwritten_latest
        for lp in latest:
            key = (lp[0], lp[1])
            got = owed_latest.get(key)
            if got is None or lp[3] >= got[3]:
                owed_latest[key] = lp

    def late_ticks(self) -> int:
        return sum(w.late for w in self.all_windows())

    def loss_bound_ms(self) -> int:
        """How old a tick must be to be durable now: queue time + flush interval + write."""
        return self.queue_delay_peak_ms + self._pipeline.flush_interval_ms + self.flush_duration_ms
