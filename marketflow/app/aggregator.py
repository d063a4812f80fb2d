"""Where ticks become windows, cached prices and minute rows.

The aggregator owns every PairWindow. One task folds batches from the fan-in queue into
per-second buckets (pure in-memory work, no I/O); another flushes once per flush interval:
changed latest prices and changed seconds go to the cache in one round trip, closed minutes go
to the minute writer in one batch. Redis and PostgreSQL therefore see work proportional to
pairs x exchanges, never to the tick rate.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from marketflow.domain.aggregates import LatestPrice, MinuteRow, SecondBucket
from marketflow.domain.errors import CacheUnavailable
from marketflow.domain.ports import MinuteStore, PriceCache
from marketflow.domain.ticks import BookUpdate, TickBatch
from marketflow.domain.window import PairWindow
from marketflow.settings import PipelineSettings

log = logging.getLogger("marketflow.aggregator")

Clock = Callable[[], int]


class RowSink(Protocol):
    """Takes closed minute rows (the MinuteWriter outbox)."""

    def submit(self, rows: Sequence[MinuteRow]) -> None: ...


class Aggregator:
    """Folds tick batches into windows; flushes the cache and minute rows periodically."""

    def __init__(
        self,
        fanin: asyncio.Queue[TickBatch],
        cache: PriceCache,
        rows: RowSink,
        pipeline: PipelineSettings,
        clock: Clock,
    ) -> None:
        self._fanin = fanin
        self._cache = cache
        self._rows = rows
        self._pipeline = pipeline
        self._clock = clock
        self.windows: dict[str, dict[str, PairWindow]] = {}
        self.books: dict[tuple[str, str], BookUpdate] = {}
        self.ticks_folded = 0
        self.batches_folded = 0
        self.cache_up = True
        self.cache_error = ""
        self._cache_retry_at = 0
        self._cache_backoff_ms = 500
        self.flushes = 0

    @property
    def cache_kind(self) -> str:
        return self._cache.kind

    # -- folding ---------------------------------------------------------------------------

    def fold(self, batch: TickBatch) -> None:
        pairs = self.windows.get(batch.exchange)
        if pairs is None:
            pairs = self.windows[batch.exchange] = {}
        for symbol, points in batch.by_symbol.items():
            w = pairs.get(symbol)
            if w is None:
                w = pairs[symbol] = PairWindow(batch.exchange, symbol)
            w.add(points, batch.received_ms)
        for book in batch.books:
            self.books[(book.exchange, book.symbol)] = book
        self.ticks_folded += batch.count
        self.batches_folded += 1

    async def consume(self) -> None:
        """Fold batches as they arrive, draining whatever is queued per wake-up."""
        queue = self._fanin
        while True:
            batch = await queue.get()
            self.fold(batch)
            queue.task_done()
            while not queue.empty():
                self.fold(queue.get_nowait())
                queue.task_done()

    def window(self, exchange: str, symbol: str) -> PairWindow | None:
        pairs = self.windows.get(exchange)
        return None if pairs is None else pairs.get(symbol)

    def all_windows(self) -> Iterator[PairWindow]:
        for pairs in self.windows.values():
            yield from pairs.values()

    def _window_for(self, exchange: str, symbol: str) -> PairWindow:
        pairs = self.windows.setdefault(exchange, {})
        w = pairs.get(symbol)
        if w is None:
            w = pairs[symbol] = PairWindow(exchange, symbol)
        return w

    # -- resuming after a restart ------------------------------------------------------------

    async def resume(self, store: MinuteStore) -> None:
        """Reload the retained window from the cache and the persisted minutes it lacks, so
        minutes that straddle a restart are rewritten whole, not with only the new ticks."""
        now_s = self._clock() // 1000
        since_s = now_s - self._pipeline.window_retention_s
        try:
            latest, seconds = await self._cache.load(since_s)
        except CacheUnavailable as exc:
            log.warning("resume_cache_unavailable error=%s", exc)
            latest, seconds = [], []
        for s in seconds:
            self._window_for(s.exchange, s.symbol).seed_second(
                s.second, s.low, s.high, s.total, s.count
            )
        for lp in latest:
            w = self._window_for(lp.exchange, lp.symbol)
            if lp.timestamp_ms > w.latest_ts:
                w.latest_ts = lp.timestamp_ms
                w.latest_price = lp.price
                w.latest_received_ms = lp.received_ms
        rows: list[MinuteRow] = []
        try:
            rows = await store.minutes_since(since_s // 60 * 60_000)
        except Exception as exc:  # noqa: BLE001 - resuming is best effort; the store may be down
            log.warning("resume_store_unavailable error=%s", exc)
        for row in rows:
            self._window_for(row.exchange, row.symbol).seed_minute(row)
        log.info(
            "resumed seconds=%d latest=%d minute_rows=%d", len(seconds), len(latest), len(rows)
        )

    # -- flushing ----------------------------------------------------------------------------

    async def run_flusher(self) -> None:
        interval = self._pipeline.flush_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def flush(self, *, final: bool = False) -> None:
        """Push changes to the cache and closed (or, when final, all) minutes to the writer."""
        now = self._clock()
        grace = self._pipeline.minute_grace_ms
        latest: list[LatestPrice] = []
        seconds: list[SecondBucket] = []
        rows: list[MinuteRow] = []
        for w in self.all_windows():
            if w.dirty_seconds:
                lp = w.latest()
                if lp is not None:
                    latest.append(lp)
                seconds.extend(w.take_dirty_seconds())
            rows.extend(w.open_minutes() if final else w.closed_minutes(now, grace))
            w.evict(self._pipeline.window_retention_s)
        if rows:
            self._rows.submit(rows)
        await self._write_cache(latest, seconds, now, force=final)
        self.flushes += 1

    async def _write_cache(
        self,
        latest: list[LatestPrice],
        seconds: list[SecondBucket],
        now: int,
        *,
        force: bool,
    ) -> None:
        if not self.cache_up:
            if now < self._cache_retry_at and not force:
                return
            # Back after an outage: refill everything we hold, not just this interval's changes.
            latest = [lp for w in self.all_windows() if (lp := w.latest()) is not None]
            seconds = [b for w in self.all_windows() for b in w.all_seconds()]
        if not latest and not seconds:
            return
        try:
            await self._cache.write(latest, seconds)
        except CacheUnavailable as exc:
            if self.cache_up:
                log.warning("cache_down kind=%s error=%s", self._cache.kind, exc)
            self.cache_up = False
            self.cache_error = str(exc)
            self._cache_backoff_ms = min(self._cache_backoff_ms * 2, 5000)
            self._cache_retry_at = now + int(self._cache_backoff_ms * random.uniform(0.5, 1.0))
            return
        if not self.cache_up:
            log.info("cache_up kind=%s refilled_seconds=%d", self._cache.kind, len(seconds))
        self.cache_up = True
        self.cache_error = ""
        self._cache_backoff_ms = 500

    def late_ticks(self) -> int:
        return sum(w.late for w in self.all_windows())
