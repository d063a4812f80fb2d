"""The rolling window of one (exchange, symbol): per-second buckets of exchange time.

Per-second buckets keep every period query exact (min, max and sum/count merge exactly) while
memory and cache writes grow with pairs x exchanges x seconds, not with the tick rate.

After a restart a window is rebuilt from two copies of the same seconds: the cache (written
every flush) and the minute rows (each carrying the seconds it was computed from). A second
only ever gains ticks, so of two versions of one second the one with more ticks is the newer:
merging second by second that way never counts a tick twice and never loses one that either
copy had. A stored row therefore never shrinks when it is rewritten.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from marketflow.domain.aggregates import Aggregate, LatestPrice, MinuteRow, SecondBucket, SecondRow
from marketflow.domain.minute_parts import MinuteParts
from marketflow.domain.seconds_pack import pack, unpack
from marketflow.domain.seconds_snapshot import WindowCapture
from marketflow.domain.ticks import PricePoint, SecondFold

Bucket = tuple[float, float, float, float]
"""(low, high, total, count): a tuple of floats, which the garbage collector stops tracking
(a list of them it scans at every full collection: at 500 pairs x 10 exchanges ~400,000
open seconds, 100+ ms per collection)."""

REWRITE_GAP_MS = 200  # a minute still fed after it closed is rewritten at most this often


class PairWindow:
    """Seconds of one (exchange, symbol) kept for ``retention_s``, plus its latest tick.

    A minute is emitted once closed (``grace_ms`` after its end by the later of the wall clock
    and the newest exchange timestamp), and again whenever a late tick changes it: rows are
    upserts, so a re-emit rewrites, never doubles. Ticks older than the retained seconds (the
    retention counts back from the pair's newest second) are counted as ``late`` and dropped.
    """

    __slots__ = (
        "active_ms",
        "bases",
        "dirty_seconds",
        "exchange",
        "floor_second",
        "late",
        "latest_price",
        "latest_received_ms",
        "latest_ts",
        "loose",
        "newest_second",
        "packed",
        "parts",
        "pending_minutes",
        "seconds",
        "symbol",
    )

    def __init__(self, exchange: str, symbol: str, floor_second: int = 0) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.seconds: dict[int, Bucket] = {}  # the open (and not yet packed) seconds
        # minute_ms -> its seconds, packed once the minute was emitted closed (seconds_pack):
        # most of the retention lives here, at ~30 bytes a second.
        self.packed: dict[int, bytes] = {}
        self.loose = False  # restored seconds of closed minutes wait to be packed
        # minute_ms -> a stored row without per-second parts (written by an older version)
        self.bases: dict[int, Aggregate] = {}
        self.dirty_seconds: set[int] = set()
        self.pending_minutes: set[int] = set()  # minute_ms changed since last emitted
        # minute_ms -> its last row's parts, while its feed is inside it (minute_parts.py)
        self.parts: dict[int, MinuteParts] = {}
        self.floor_second = floor_second
        self.late = 0
        self.latest_price = 0.0
        self.latest_ts = -1
        self.latest_received_ms = 0
        self.newest_second = -1  # newest second held, seeded ones included
        # Our clock when the aggregator last folded into this window: a feed whose batches
        # wait in queues longer than the grace is still a feed sending (see _feed_inside).
        self.active_ms = 0

    def add(self, points: Iterable[PricePoint], received_ms: int) -> None:  # noqa: C901 - one frame per batch on the hot path
        """Fold ticks of this pair into their seconds (the per-tick hot path)."""
        seconds = self.seconds
        dirty = self.dirty_seconds
        floor = self.floor_second
        latest_ts = self.latest_ts
        latest_price = self.latest_price
        cur_sec = -1
        lo = hi = total = n = 0.0
        for price, ts in points:
            sec = ts // 1000
            if sec != cur_sec:
                # Consecutive ticks mostly share a second: the run is summed in locals and
                # its bucket stored once, when the run ends.
                if cur_sec >= 0:
                    seconds[cur_sec] = (lo, hi, total, n)
                if sec < floor:
                    self.late += 1
                    cur_sec = -1
                    continue
                got = seconds.get(sec)
                if got is None and self.packed:
                    got = self._unpacked(sec)
                if got is None:
                    lo = hi = price
                    total = n = 0.0
                else:
                    lo, hi, total, n = got
                dirty.add(sec)
                cur_sec = sec
            if price < lo:
                lo = price
            elif price > hi:
                hi = price
            total += price
            n += 1
            if ts >= latest_ts:
                latest_ts = ts
                latest_price = price
        if cur_sec >= 0:
            seconds[cur_sec] = (lo, hi, total, n)
        if latest_ts != self.latest_ts or latest_price != self.latest_price:
            self.latest_ts = latest_ts
            self.latest_price = latest_price
            self.latest_received_ms = received_ms
            if latest_ts // 1000 > self.newest_second:
                self.newest_second = latest_ts // 1000

    def add_second(self, second: int, f: SecondFold, received_ms: int) -> None:
        """Merge one second a parser folded (``SecondFold``) into this window."""
        if second < self.floor_second:
            self.late += int(f[3])
            return
        b = self.seconds.get(second)
        if b is None and self.packed:
            b = self._unpacked(second)
        if b is None:
            self.seconds[second] = (f[0], f[1], f[2], f[3])
        else:
            lo, hi, total, n = b
            self.seconds[second] = (
                f[0] if f[0] < lo else lo,
                f[1] if f[1] > hi else hi,
                total + f[2],
                n + f[3],
            )
        self.dirty_seconds.add(second)
        ts = int(f[4])
        if ts >= self.latest_ts and (ts != self.latest_ts or f[5] != self.latest_price):
            self.latest_ts = ts
            self.latest_price = f[5]
            self.latest_received_ms = received_ms
            if second > self.newest_second:
                self.newest_second = second

    def _unpacked(self, second: int) -> Bucket | None:
        """The bucket of ``second`` after unpacking its minute (a late tick for a closed
        minute: it becomes open again, and is packed again once re-emitted)."""
        minute_ms = second // 60 * 60_000
        blob = self.packed.pop(minute_ms, None)
        if blob is None:
            return None
        for s, lo, hi, total, n in unpack(minute_ms // 1000, blob):
            self.seconds[s] = (lo, hi, total, n)
        return self.seconds.get(second)

    def _pack(self, minute_ms: int) -> None:
        """Move a closed, emitted minute's seconds out of the dict into bytes."""
        start = minute_ms // 1000
        secs = [s for s in range(start, start + 60) if s in self.seconds]
        if not secs or any(s in self.dirty_seconds for s in secs):
            return
        buckets = [(s, self.seconds.pop(s)) for s in secs]
        self.parts.pop(minute_ms, None)
        self.packed[minute_ms] = pack(start, ((s, b[0], b[1], b[2], int(b[3])) for s, b in buckets))

    def _pack_loose(self, clock: int, grace_ms: int) -> None:
        """Pack every closed minute that is not pending (restored ones, and minutes a feed
        catching up was still inside when they closed).

        While the feed is still inside the first held second's minute (mostly the oldest:
        seconds are added in time order) nothing is scanned: a feed catching up stays
        inside for minutes, and every sweep scanned its ~120 open seconds for nothing."""
        self.loose = False
        seconds = self.seconds
        if seconds and self._feed_inside(next(iter(seconds)) // 60 * 60_000, clock, grace_ms):
            self.loose = True
            return
        minutes = {s // 60 * 60_000 for s in seconds}
        for m in minutes - self.pending_minutes:
            if m + 60_000 + grace_ms > clock:
                continue
            if self._feed_inside(m, clock, grace_ms):
                self.loose = True  # again at a later sweep
            else:
                self._pack(m)

    def _feed_inside(self, minute_ms: int, clock: int, grace_ms: int) -> bool:
        """True while this window's feed may still send ticks of a closed minute: its
        newest tick is less than a minute past the minute's end and it received one within
        ``grace_ms``. That is a feed catching up (a backlog, a replay, a Kafka partition
        taken over). Its minute's row is written at every close as always, but its seconds
        stay unpacked: packing it at once and unpacking it for every later tick would cost
        a minute's work per tick."""
        return (
            self.newest_second < (minute_ms + 120_000) // 1000
            and max(self.latest_received_ms, self.active_ms) + grace_ms > clock
        )

    def latest(self) -> LatestPrice | None:
        if self.latest_ts < 0:
            return None
        return LatestPrice(
            self.exchange, self.symbol, self.latest_price, self.latest_ts, self.latest_received_ms
        )

    # -- restoring after a restart -----------------------------------------------------------

    def seed_second(self, second: int, low: float, high: float, total: float, count: int) -> bool:
        """Restore one version of a second written by an earlier run; the fuller version wins.

        Returns True when this version replaced what the window held (it had more ticks).
        """
        if second < self.floor_second or count <= 0:
            return False
        minute_ms = second // 60 * 60_000
        if minute_ms in self.bases:
            return False  # that minute is restored whole from an older-format row
        b = self.seconds.get(second)
        if b is None and self.packed:
            b = self._unpacked(second)
        if b is not None and b[3] >= count:
            return False
        self.seconds[second] = (low, high, total, count)
        if self.parts:
            self.parts.pop(minute_ms, None)
        self.loose = True
        if second > self.newest_second:
            self.newest_second = second
        return True

    def seed_row(self, row: MinuteRow) -> bool:
        """Restore a stored minute. Returns True when the window now holds more than the row
        (cached seconds it lacked), so the row must be written again."""
        start = row.minute_ms // 1000
        if start < self.floor_second:
            return False
        if row.seconds is not None:
            for s, low, high, total, n in row.seconds:
                self.seed_second(s, low, high, total, n)
            return self.minute_count(row.minute_ms) > row.count
        # An older-format row cannot be split by second: keep it whole unless the cached
        # seconds of that minute already hold at least as many ticks (then they are newer).
        self._unpacked(start)
        cached = [b for s, b in self.seconds.items() if start <= s < start + 60]
        if sum(int(b[3]) for b in cached) >= row.count:
            return True
        for s in [s for s in self.seconds if start <= s < start + 60]:
            del self.seconds[s]
        self.parts.pop(row.minute_ms, None)
        self.bases[row.minute_ms] = row.aggregate()
        if start + 59 > self.newest_second:
            self.newest_second = start + 59
        return False

    def seed_minute(self, row: MinuteRow) -> None:
        """Restore a stored minute (see ``seed_row``)."""
        self.seed_row(row)

    def mark_pending(self, minute_ms: int) -> None:
        """Emit this minute again at the next close (it holds more than its stored row)."""
        self.pending_minutes.add(minute_ms)

    # -- flushing ---------------------------------------------------------------------------

    def take_dirty_seconds(self, newly_pending: list[int] | None = None) -> list[SecondRow]:
        """Seconds changed since the last call; their minutes become pending (those that were
        not are appended to ``newly_pending``)."""
        out: list[SecondRow] = []
        exchange, symbol = self.exchange, self.symbol
        seconds = self.seconds
        pending = self.pending_minutes
        parts = self.parts
        for sec in self.dirty_seconds:
            b = seconds.get(sec)
            if b is None:
                continue
            out.append((exchange, symbol, sec, b[0], b[1], b[2], int(b[3])))
            minute = sec // 60 * 60_000
            if parts and (kept := parts.get(minute)) is not None:
                kept.changed.add(sec)
            if minute not in pending:
                pending.add(minute)
                if newly_pending is not None:
                    newly_pending.append(minute)
        self.dirty_seconds.clear()
        return out

    def capture(self) -> WindowCapture:
        """Everything held, for a ``SecondsSnapshot``: the open seconds copied, the packed
        minutes by reference (bytes never change)."""
        return (
            self.exchange,
            self.symbol,
            [(s, b[0], b[1], b[2], int(b[3])) for s, b in self.seconds.items()],
            list(self.packed.items()),
        )

    def all_seconds(self) -> list[SecondBucket]:
        return [
            SecondBucket(self.exchange, self.symbol, s, b[0], b[1], b[2], int(b[3]))
            for s, b in self._every_second()
        ]

    def _every_second(self) -> Iterator[tuple[int, Bucket]]:
        yield from self.seconds.items()
        for m, blob in self.packed.items():
            for s, lo, hi, total, n in unpack(m // 1000, blob):
                yield s, (lo, hi, total, n)

    def _seconds_between(self, first: int, last: int) -> Iterator[tuple[int, Bucket]]:
        """Seconds ``first`` .. ``last`` inclusive, open or packed."""
        for s, b in self.seconds.items():
            if first <= s <= last:
                yield s, b
        for m, blob in self.packed.items():
            start = m // 1000
            if start > last or start + 59 < first:
                continue
            for s, lo, hi, total, n in unpack(start, blob):
                if first <= s <= last:
                    yield s, (lo, hi, total, n)

    def minute_seconds(self, minute_ms: int) -> list[tuple[int, Bucket]]:
        start = minute_ms // 1000
        return sorted(self._seconds_between(start, start + 59))

    def minute_count(self, minute_ms: int) -> int:
        """Ticks held for ``minute_ms``: ``minute_aggregate``'s count without building it
        (a restore compares it with every stored row's, 55,000 minutes at 500 x 10)."""
        start = minute_ms // 1000
        seconds = self.seconds
        n = sum(int(b[3]) for s in range(start, start + 60) if (b := seconds.get(s)) is not None)
        blob = self.packed.get(minute_ms) if self.packed else None
        if blob is not None:
            n += sum(st[4] for st in unpack(start, blob))
        base = self.bases.get(minute_ms) if self.bases else None
        return n + base.count if base is not None else n

    def minute_aggregate(self, minute_ms: int) -> Aggregate | None:
        parts = [_agg(s, b) for s, b in self.minute_seconds(minute_ms)]
        base = self.bases.get(minute_ms)
        if base is not None:
            parts.append(base)
        return Aggregate.merged(parts)

    def minute_row(
        self, minute_ms: int, covered_ms: int | None, *, keep: bool = False
    ) -> MinuteRow | None:
        """The row of ``minute_ms`` as held now. ``keep``: it will be rewritten soon (its
        feed is inside it), so keep its parts and let the next build update only them."""
        if minute_ms not in self.bases:
            return self._row_of_seconds(minute_ms, covered_ms, keep)
        secs = self.minute_seconds(minute_ms)
        parts = [_agg(s, b) for s, b in secs]
        base = self.bases.get(minute_ms)
        if base is not None:
            parts.append(base)
        agg = Aggregate.merged(parts)
        if agg is None:
            return None
        states = None
        if base is None:
            states = tuple((s, b[0], b[1], b[2], int(b[3])) for s, b in secs)
        return MinuteRow.of(self.exchange, self.symbol, minute_ms, agg, covered_ms, states)

    def _row_of_seconds(
        self, minute_ms: int, covered_ms: int | None, keep: bool
    ) -> MinuteRow | None:
        """``minute_row`` of a minute held as seconds only (every minute but an older-format
        row's): its 60 seconds looked up, no Aggregate per second, or only the seconds
        changed since its last build when its parts were kept. A feed catching up has its
        rows rewritten at every sweep, thousands a second with hundreds of pairs."""
        seconds = self.seconds
        kept = self.parts.pop(minute_ms, None) if self.parts else None
        if kept is not None and not self.dirty_seconds and kept.refresh(seconds):
            if keep:
                self.parts[minute_ms] = kept
            return kept.row(self.exchange, self.symbol, minute_ms, covered_ms)
        start = minute_ms // 1000
        states = [
            (s, b[0], b[1], b[2], int(b[3]))
            for s in range(start, start + 60)
            if (b := seconds.get(s)) is not None
        ]
        blob = self.packed.get(minute_ms) if self.packed else None
        if blob is not None:
            states = sorted([*states, *unpack(start, blob)])
        if not states:
            return None
        if keep and blob is None:
            self.parts[minute_ms] = MinuteParts(start, states)
        count = sum(st[4] for st in states)
        total = math.fsum(st[3] for st in states) if len(states) > 1 else states[0][3]
        return MinuteRow(
            self.exchange,
            self.symbol,
            minute_ms,
            total / count,
            min(st[1] for st in states),
            max(st[2] for st in states),
            count,
            covered_ms,
            tuple(states),
        )

    def closed_minutes(
        self,
        clock_ms: int,
        grace_ms: int,
        covered: dict[int, int] | None = None,
        postponed: list[int] | None = None,
    ) -> list[MinuteRow]:
        """Pending minutes that have closed by ``clock_ms``; they stop being pending.

        A minute closed by our clock but not yet by the feed's (a backlog, a replay, a clock
        behind ours) is written again while its feed still sends it: if the daemon dies with
        Redis emptied, only what came since its last write may be lost, so it cannot wait
        for the feed to pass it. With ``postponed`` (the sweep's), it is written at most once
        per ``REWRITE_GAP_MS``: a rewrite not yet due leaves it pending, and when it is due
        is appended there, for the sweep to come back then. Behind its feeds at 500 pairs x 10
        exchanges, every window has such a minute, and a rewrite at every 20 ms sweep took
        the core the daemon needed to catch up."""
        clock = max(clock_ms, self.latest_ts)
        rows = []
        packed_before = len(self.packed)
        waiting = False  # a rewrite was postponed: the feed is still inside a closed minute
        for minute in sorted(self.pending_minutes):
            if minute + 60_000 + grace_ms > clock:
                continue
            inside = self._feed_inside(minute, clock_ms, grace_ms)
            kept = self.parts.get(minute) if inside and self.parts else None
            if (
                kept is not None
                and postponed is not None
                and clock_ms - kept.built_ms < REWRITE_GAP_MS
            ):
                postponed.append(kept.built_ms + REWRITE_GAP_MS)
                waiting = True
                continue
            self.pending_minutes.discard(minute)
            row = self.minute_row(minute, _covered(covered, minute), keep=inside)
            if inside and (kept := self.parts.get(minute)) is not None:
                kept.built_ms = clock_ms
            if row is not None:
                rows.append(row)
                if row.seconds is None:
                    pass
                elif inside:
                    self.loose = True  # packed by a later sweep, once the feed moved on
                else:
                    self._pack(minute)
        if self.loose and not waiting:  # (waiting: packing is for a visit once it moved on)
            self._pack_loose(clock, grace_ms)
        if len(self.packed) != packed_before:
            # A dict keeps its table when keys leave: copy it down to the open seconds.
            self.seconds = dict(self.seconds)
        return rows

    def open_minutes(self, covered: dict[int, int] | None = None) -> list[MinuteRow]:
        """Every pending minute, closed or not (the partial minute at shutdown)."""
        rows = []
        for minute in sorted(self.pending_minutes):
            row = self.minute_row(minute, _covered(covered, minute))
            if row is not None:
                rows.append(row)
        self.pending_minutes.clear()
        return rows

    def evict(self, retention_s: int) -> None:
        """Forget whole minutes older than the retention; later ticks for them count as late.

        The retention runs on the pair's own (exchange) time, not the wall clock: a replay of
        a capture hours old keeps its window, and a feed that stops keeps its last minutes.
        """
        if self.newest_second < 0:
            return
        floor = (self.newest_second - retention_s) // 60 * 60
        if floor <= self.floor_second:  # the common case, once per flush: nothing to do
            return
        if any(m // 1000 < floor for m in self.pending_minutes):
            floor = min(floor, min(self.pending_minutes) // 1000)
        if floor <= self.floor_second:
            return
        self.floor_second = floor
        for s in [s for s in self.seconds if s < floor]:
            del self.seconds[s]
        for m in [m for m in self.bases if m // 1000 < floor]:
            del self.bases[m]
        for m in [m for m in self.packed if m // 1000 < floor]:
            del self.packed[m]
        for m in [m for m in self.parts if m // 1000 < floor]:
            del self.parts[m]

    # -- queries ----------------------------------------------------------------------------

    def oldest_minute_ms(self) -> int | None:
        """Start of the oldest minute held here: history before it comes from storage.

        The window holds every minute from its floor on (older ones are late), so the floor
        is the bound once anything was evicted or restored; before that, the oldest second.
        """
        starts = [s // 60 * 60_000 for s in self.seconds]
        starts.extend(self.bases)
        starts.extend(self.packed)
        if not starts:
            return None
        return min(min(starts), self.floor_second * 1000) if self.floor_second else min(starts)

    def period(self, from_second: int, to_second: int) -> Aggregate | None:
        """Seconds ``from_second`` .. ``to_second`` inclusive; an older-format stored minute
        counts when it lies wholly inside."""
        parts = [_agg(s, b) for s, b in self._seconds_between(from_second, to_second)]
        parts.extend(
            base
            for m, base in self.bases.items()
            if m // 1000 >= from_second and m // 1000 + 59 <= to_second
        )
        return Aggregate.merged(parts)

    def everything(self) -> Aggregate | None:
        parts = [_agg(s, b) for s, b in self._every_second()]
        parts.extend(self.bases.values())
        return Aggregate.merged(parts)

    def minutes_held(self) -> set[int]:
        minutes = {s // 60 * 60_000 for s in self.seconds}
        minutes.update(self.bases)
        minutes.update(self.packed)
        return minutes


def _covered(covered: dict[int, int] | None, minute_ms: int) -> int | None:
    if covered is None:
        return None
    return min(60_000, covered.get(minute_ms, 0))


def _agg(second: int, b: Bucket) -> Aggregate:
    ms = second * 1000
    return Aggregate(b[0], b[1], b[2], int(b[3]), ms, ms)
