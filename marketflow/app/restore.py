"""Restart: rebuild the aggregator's windows from what an earlier run made durable.

Two copies survive a crash: the cache's seconds (written every flush) and the store's minute
rows (each with the seconds it was computed from). Both are read for whole minutes from the
start of the retention (a minute is never half-loaded), merged second by second (the fuller
version of a second wins), and every minute the merge holds more of than its stored row is
marked to be written again, so rows lost in a crash (the minute that closed just before it,
rows that sat in memory while the store was down) are written after it. Nothing older than
the restored range is accepted afterwards (it is counted late): such a tick could otherwise
overwrite a full stored row with a one-tick one.

Each source resumes from the newest durable mark (by the time of the flush that wrote it):
the cache's and the store's are both candidates, and neither can point past the state it
was written with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Protocol

from marketflow.domain.aggregates import LatestPrice, Mark, MinuteRow, SecondBucket
from marketflow.domain.errors import CacheUnavailable, StoreUnavailable
from marketflow.domain.ports import MinuteStore, PriceCache
from marketflow.domain.window import PairWindow

log = logging.getLogger("marketflow.restore")

SEED_SLICE = 20_000  # seconds seeded between two turns of the loop (~20 ms)


class Restorable(Protocol):
    """What a restore rebuilds (app.aggregator.Aggregator): windows, marks and coverage."""

    floor_second: int
    marks: dict[str, Mark]
    coverage: dict[str, dict[int, int]]

    def window_for(self, exchange: str, symbol: str) -> PairWindow: ...

    def all_windows(self) -> Iterator[PairWindow]: ...

    def restore_position(self, source: str, mark: Mark) -> None: ...


async def restore(
    agg: Restorable,
    cache: PriceCache,
    store: MinuteStore,
    retention_s: int,
    *,
    owns: Callable[[str], bool] | None = None,
    sources: Callable[[str], bool] | None = None,
) -> None:
    """``owns``: restore only the symbols it accepts, and ``sources``: only the marks of
    the sources it accepts (a Kafka aggregate node taking partitions over: the other
    nodes' symbols and marks are theirs to write); the floor of other windows stays."""
    # The retention runs on exchange time (a replay or a feed behind our clock keeps its
    # window), so the range to restore ends at the newest second either copy holds.
    try:
        # All of it (its keys expire by themselves), of the symbols taken over when some are.
        wanted = None if owns is None else (lambda _exchange, symbol: owns(symbol))
        latest, seconds = await cache.load(0, wanted)
        cache_marks = await cache.load_marks()
    except CacheUnavailable as exc:
        log.warning("restore_cache_unavailable error=%s", exc)
        latest, seconds, cache_marks = [], [], {}
    store_marks: dict[str, Mark] = {}
    newest_row: int | None = None
    try:
        newest_row = await store.newest_minute_ms()
        store_marks = await store.load_marks()
    except StoreUnavailable as exc:
        log.warning("restore_store_unavailable error=%s", exc)
    if sources is not None:
        cache_marks, store_marks = _only(sources, cache_marks), _only(sources, store_marks)
    newest_s = _newest_second(seconds, latest, newest_row)
    for source in {*cache_marks, *store_marks}:
        candidates = [m for m in (cache_marks.get(source), store_marks.get(source)) if m]
        agg.restore_position(source, max(candidates, key=lambda m: m[1]))
    if newest_s is None:  # nothing stored anywhere: nothing to protect, nothing to restore
        log.info("restored nothing: no cached seconds, no stored rows")
        return
    since_s = (newest_s - retention_s) // 60 * 60  # whole minutes only
    floor_before = agg.floor_second
    agg.floor_second = since_s
    rows: list[MinuteRow] = []
    try:
        rows = await store.minutes_since(since_s * 1000)
    except StoreUnavailable as exc:
        log.warning("restore_store_unavailable error=%s", exc)
    if owns is not None:
        rows = [r for r in rows if owns(r.symbol)]
    rewrite = await _seed(agg, seconds, rows, since_s)
    _seed_latest(agg, latest)
    if owns is not None:  # the windows just made have the floor; later ones start open
        agg.floor_second = floor_before
    for w in agg.all_windows():
        w.evict(retention_s)
    log.info(
        "restored since_s=%d seconds=%d minute_rows=%d rewrite_minutes=%d latest=%d marks=%s",
        since_s,
        len(seconds),
        len(rows),
        rewrite,
        len(latest),
        {k: v[0] for k, v in agg.marks.items()},
    )


def _newest_second(
    seconds: list[SecondBucket], latest: list[LatestPrice], newest_row: int | None
) -> int | None:
    """The newest second either copy holds (None: nothing anywhere)."""
    newest = [lp.timestamp_ms // 1000 for lp in latest]
    if seconds:  # in C: millions of seconds at 500 pairs x 10 exchanges
        newest.append(max(seconds, key=itemgetter(2)).second)
    if newest_row is not None:
        newest.append(newest_row // 1000 + 59)
    return max(newest, default=None)


def _seed_latest(agg: Restorable, latest: list[LatestPrice]) -> None:
    for lp in latest:
        w = agg.window_for(lp.exchange, lp.symbol)
        if lp.timestamp_ms > w.latest_ts:
            w.latest_ts = lp.timestamp_ms
            w.latest_price = lp.price
            w.latest_received_ms = lp.received_ms
            w.newest_second = max(w.newest_second, lp.timestamp_ms // 1000)


def _only(sources: Callable[[str], bool], marks: dict[str, Mark]) -> dict[str, Mark]:
    return {k: v for k, v in marks.items() if sources(k)}


async def _seed(
    agg: Restorable, seconds: list[SecondBucket], rows: list[MinuteRow], since_s: int
) -> int:
    """Merge cached seconds (from ``since_s`` on) and stored rows into the windows; mark for
    rewriting every minute the merge holds more of than its row. Returns how many.

    Lets the loop run every ``SEED_SLICE`` seconds or rows: 500 pairs x 10 exchanges are
    3.3 million seconds, seconds of seeding (the aggregator holds its flush lock meanwhile,
    so no flush sees a window half restored)."""
    touched: set[tuple[str, str, int]] = set()
    for n, s in enumerate(seconds, 1):
        if s.second < since_s:
            continue
        w = agg.window_for(s.exchange, s.symbol)
        if w.seed_second(s.second, s.low, s.high, s.total, s.count):
            touched.add((s.exchange, s.symbol, s.second // 60 * 60_000))
        if n % SEED_SLICE == 0:
            await asyncio.sleep(0)
    stored = {r.key: r for r in rows}
    for n, row in enumerate(rows, 1):
        if n % (SEED_SLICE // 60) == 0:
            await asyncio.sleep(0)
        if row.covered_ms:
            minutes = agg.coverage.setdefault(row.exchange, {})
            minutes[row.minute_ms] = max(minutes.get(row.minute_ms, 0), row.covered_ms)
        if agg.window_for(row.exchange, row.symbol).seed_row(row):
            touched.add(row.key)
    rewrite = 0
    for n, key in enumerate(touched, 1):
        exchange, symbol, minute = key
        w = agg.window_for(exchange, symbol)
        held = w.minute_count(minute)
        was = stored.get(key)
        if held > 0 and (was is None or held > was.count):
            w.mark_pending(minute)
            rewrite += 1
        if n % (SEED_SLICE // 60) == 0:
            await asyncio.sleep(0)
    return rewrite
