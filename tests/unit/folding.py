"""An independent oracle of the parser's folded form (``TickBatch.seconds()``).

Written without the code under test: group the expected ticks by (symbol, second) in arrival
order, then take min, max, the sum in arrival order, the count, and the newest tick (ties go
to the later one).
"""

from __future__ import annotations

from marketflow.domain.ticks import Tick


def expect_seconds(ticks: list[Tick]) -> dict[tuple[str, int], list[float]]:
    groups: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for symbol, price, ts in ticks:
        groups.setdefault((symbol, ts // 1000), []).append((price, ts))
    out: dict[tuple[str, int], list[float]] = {}
    for key, points in groups.items():
        prices = [p for p, _ in points]
        total = 0.0
        for p in prices:
            total += p
        newest = max(ts for _, ts in points)
        last_price = [p for p, ts in points if ts == newest][-1]
        out[key] = [min(prices), max(prices), total, len(points), newest, last_price]
    return out
