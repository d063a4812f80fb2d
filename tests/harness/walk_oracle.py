"""A second, independent implementation of the simulators' price walk and line format.

Written from docs/protocols.md (JSON ticks) and the walk's documented rule, not imported from
marketflow: tests compare what the simulator and the test-mode generator send with this.
BTCUSDT moves by U(-250, 250) but never below 99 % of its last price, every other pair by
U(-1 %, +1 %); one ``random.Random(seed)`` draw per pair per round, pairs in wire order.
"""

from __future__ import annotations

import random

PAIRS = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")
# The reference programs' starting prices (40101's for any other port).
STARTS = {
    40101: (100000.0, 0.30, 3.9, 200.0, 3050.0),
    40102: (100029.0, 0.28, 3.72, 197.0, 3034.0),
    40103: (100049.0, 0.31, 3.66, 202.0, 3022.0),
}


def walk_rounds(port: int, seed: int, rounds: int) -> list[list[float]]:
    """The first ``rounds`` rounds of prices, in PAIRS order."""
    rng = random.Random(seed)
    prices = list(STARTS.get(port, STARTS[40101]))
    out = []
    for _ in range(rounds):
        for i, p in enumerate(prices):
            move = rng.random()
            if i == 0:
                delta = move * 500 - 250  # U(-250, 250), added to the price
                prices[i] = max(p + delta, p * 0.99)
            else:
                change = move * 0.02 - 0.01  # U(-1 %, +1 %)
                prices[i] = p * (1 + change)
        out.append(prices.copy())
    return out


def line(symbol: str, price: float, timestamp_ms: int) -> bytes:
    """One feed line as the reference programs write it."""
    return b'{"symbol":"%s","price":%s,"timestamp":%d}\n' % (
        symbol.encode(),
        repr(price).encode(),
        timestamp_ms,
    )
