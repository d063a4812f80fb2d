"""The exchanges' price walks and their wire lines (docs/protocols.md, JSON ticks).

Shared by the simulator (a stand-in for the reference exchange programs) and the test-mode
generator, so both produce exactly the feed's line format. A walk is deterministic for a given
seed: tests and benchmarks can replay it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

PAIRS: tuple[str, ...] = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")
"""The pairs in the order the reference programs send them every 100 ms."""

VENUE_START_PRICES: tuple[Mapping[str, float], ...] = (
    {"BTCUSDT": 100000.0, "DOGEUSDT": 0.30, "TONUSDT": 3.9, "SOLUSDT": 200.0, "ETHUSDT": 3050.0},
    {"BTCUSDT": 100029.0, "DOGEUSDT": 0.28, "TONUSDT": 3.72, "SOLUSDT": 197.0, "ETHUSDT": 3034.0},
    {"BTCUSDT": 100049.0, "DOGEUSDT": 0.31, "TONUSDT": 3.66, "SOLUSDT": 202.0, "ETHUSDT": 3022.0},
)
"""Starting prices of the three reference exchange programs, in exchange order."""
UNKNOWN_PAIR_START = 100.0  # a configured pair the reference programs do not know


def venue_start_prices(index: int) -> Mapping[str, float]:
    """Starting prices of reference exchange ``index`` (0-based; the first one's beyond)."""
    if 0 <= index < len(VENUE_START_PRICES):
        return VENUE_START_PRICES[index]
    return VENUE_START_PRICES[0]


class PriceWalk:
    """One random walk per pair; all pairs advance together, one step per round.

    BTCUSDT moves by ``U(-250, 250)`` but never below 99 % of its last price; the others move
    by ``U(-1 %, +1 %)``. Any pair without a starting price starts at ``UNKNOWN_PAIR_START``.
    """

    __slots__ = ("_btc", "_prices", "_rng", "pairs")

    def __init__(
        self,
        starts: Mapping[str, float],
        pairs: Sequence[str] = PAIRS,
        seed: int | None = None,
    ) -> None:
        self.pairs = tuple(pairs)
        self._prices = [float(starts.get(p, UNKNOWN_PAIR_START)) for p in self.pairs]
        self._btc = [p == "BTCUSDT" for p in self.pairs]
        self._rng = random.Random(seed)

    def prices(self) -> tuple[float, ...]:
        """Current prices, in ``pairs`` order."""
        return tuple(self._prices)

    def step(self) -> list[float]:
        """Advance every pair one tick and return the new prices, in ``pairs`` order."""
        rand = self._rng.random
        prices = self._prices
        for i, is_btc in enumerate(self._btc):
            p = prices[i]
            if is_btc:
                p = max(p + (rand() * 500.0 - 250.0), 0.99 * p)
            else:
                p = p * (1.0 + (rand() * 0.02 - 0.01))
            prices[i] = p
        return prices.copy()


def render_rounds(walk: PriceWalk, rounds: int, timestamp_ms: int) -> bytes:
    """``rounds`` steps of ``walk`` as feed lines, one line per pair per round, one timestamp.

    Built as one string join and one encode: at firehose rates the per-line cost is the
    budget (a ``bytes`` concatenation or an ``orjson.dumps`` per line costs more).
    """
    suffix = f',"timestamp":{timestamp_ms}}}\n'
    prefixes = [f'{{"symbol":"{p}","price":' for p in walk.pairs]
    parts: list[str] = []
    append = parts.append
    step = walk.step
    for _ in range(rounds):
        for prefix, price in zip(prefixes, step(), strict=True):
            append(prefix)
            append(repr(price))
            append(suffix)
    return "".join(parts).encode()
