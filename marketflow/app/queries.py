"""Price queries: latest, highest, lowest and average, per exchange or across the mode's
exchanges, over a period or over all stored history.

Recent seconds come from the in-memory windows (restored from the cache at start); minutes
older than what the windows hold come from the minute store, merged exactly (min of mins,
max of maxes, sum and count).

A period of N seconds covers the N seconds of exchange time ending with the current one: from
``now_s - N + 1`` through ``now_s`` (so ``1s`` is the current second). Where it reaches back
past the window, stored minutes count whole, and the minute holding the period's start counts
its seconds from the start on (rows keep their seconds), so a period is exact at any length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from marketflow.app.aggregator import Aggregator
from marketflow.app.peer_windows import PeerWindows
from marketflow.domain.aggregates import Aggregate, LatestPrice
from marketflow.domain.errors import NotFound, StoreUnavailable
from marketflow.domain.ports import MinuteStore
from marketflow.domain.window import PairWindow

Stat = Literal["highest", "lowest", "average"]
Clock = Callable[[], int]


@dataclass(frozen=True, slots=True)
class StatAnswer:
    symbol: str
    exchange: str  # "all" across exchanges
    stat: Stat
    price: float
    timestamp_ms: int
    period: str  # "1m", or "all" for all stored history
    count: int
    partial: bool  # True when the minute store could not be read
    incomplete_minutes: int = 0  # closed minutes in the answer the source was not up for

    @property
    def complete(self) -> bool:
        return not self.partial and self.incomplete_minutes == 0


class PriceQueries:
    """Answers price questions from the aggregator's windows and the minute store."""

    def __init__(
        self,
        aggregator: Aggregator,
        store: Callable[[], MinuteStore],
        exchanges: Callable[[], Sequence[str]],
        known_exchanges: Callable[[], Sequence[str]],
        pairs: Sequence[str],
        clock: Clock,
        *,
        peers: PeerWindows | None = None,
    ) -> None:
        """``peers``: the windows of pairs other aggregate nodes hold (peer_windows.py)."""
        self._agg = aggregator
        self._store = store
        self._exchanges = exchanges  # those of the mode in force: "all" means these
        self._known = known_exchanges
        self._pairs = frozenset(pairs)
        self._clock = clock
        self._peers = peers

    def _scope(self, symbol: str, exchange: str | None) -> list[str]:
        if symbol not in self._pairs:
            raise NotFound(f"unknown symbol {symbol[:32]!r}")
        if exchange is None:
            return list(self._exchanges())
        if exchange not in self._known():
            raise NotFound(f"unknown exchange {exchange[:64]!r}")
        return [exchange]

    def latest(self, symbol: str, exchange: str | None) -> tuple[LatestPrice, str]:
        """The newest tick, and the exchange label to answer with ("all" across exchanges)."""
        best: LatestPrice | None = None
        for ex in self._scope(symbol, exchange):
            w = self._window(ex, symbol)
            lp = w.latest() if w is not None else None
            if lp is not None and (best is None or lp.timestamp_ms > best.timestamp_ms):
                best = lp
        if best is None:
            raise NotFound(f"no price yet for {symbol} on {exchange or 'any exchange'}")
        return best, exchange or "all"

    async def stat(
        self, stat: Stat, symbol: str, exchange: str | None, period_s: int | None, label: str
    ) -> StatAnswer:
        scope = self._scope(symbol, exchange)
        now = self._clock()
        now_s = now // 1000
        from_s = None if period_s is None else now_s - period_s + 1
        parts: list[Aggregate] = []
        bounds: dict[str, int] = {}
        incomplete = 0
        await self.prepare(symbol, exchange)
        for ex in scope:
            w = self._window(ex, symbol)
            if w is None:
                bounds[ex] = now + 1
                continue
            part = w.everything() if from_s is None else w.period(from_s, now_s)
            if part is not None:
                parts.append(part)
            incomplete += self._incomplete(w.minutes_held(), ex, from_s, now)
            oldest = w.oldest_minute_ms()
            bounds[ex] = oldest if oldest is not None else now + 1
        partial = False
        needs_store = from_s is None or any(from_s * 1000 < b for b in bounds.values())
        if needs_store:
            try:
                stored = await self._store().history(
                    symbol, bounds, since_ms=None if from_s is None else from_s * 1000
                )
            except StoreUnavailable:
                partial = True
            else:
                if stored.aggregate is not None:
                    parts.append(stored.aggregate)
                incomplete += stored.incomplete_minutes
        agg = Aggregate.merged(parts)
        if agg is None:
            raise NotFound(f"no data for {symbol} on {exchange or 'any exchange'} in {label}")
        if stat == "highest":
            price, ts = agg.high, agg.high_ms
        elif stat == "lowest":
            price, ts = agg.low, agg.low_ms
        else:
            price, ts = agg.average, now
        ex_label = exchange or "all"
        return StatAnswer(symbol, ex_label, stat, price, ts, label, agg.count, partial, incomplete)

    def _window(self, exchange: str, symbol: str) -> PairWindow | None:
        w = self._agg.window(exchange, symbol)
        if w is None and self._peers is not None:
            return self._peers.window(exchange, symbol)
        return w

    async def prepare(self, symbol: str, exchange: str | None) -> None:
        """Before answering about a pair held by another aggregate node: its windows are
        fresh from the cache (a no-op for this node's own pairs and outside that role)."""
        if self._peers is None or symbol not in self._pairs:
            return
        if exchange is None:
            exchanges = list(self._exchanges())
        else:
            exchanges = [exchange] if exchange in self._known() else []
        if any(self._agg.window(ex, symbol) is None for ex in exchanges):
            await self._peers.ready()

    def _incomplete(self, minutes: set[int], exchange: str, from_s: int | None, now: int) -> int:
        """Closed minutes of the window in the answer that were not covered whole."""
        first = None if from_s is None else from_s // 60 * 60_000
        return sum(
            1
            for m in minutes
            if (first is None or m >= first)
            and m + 60_000 <= now
            and self._agg.covered_ms(exchange, m) < 60_000
        )
