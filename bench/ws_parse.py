"""Parse cost of Binance combined-stream frames: the parser's fast path vs its careful path.

``python -m bench.ws_parse``: microseconds per frame, all measured in this one run (the machine
is shared: compare the ratio, not the absolute figures across runs), on the simulator's frames
(half trades, half bookTickers, five pairs):

- ``orjson_us``: ``orjson.loads`` of each frame alone, the least any JSON parser does;
- ``fast_us``: CombinedStreamParser.parse of a burst (msgspec typed decode, the normal case);
- ``careful_us``: the same parser with its fast path off (what a frame with a refused field
  costs: every frame decoded by orjson and checked field by field).

The last line is one JSON object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import orjson

from marketflow.adapters.feeds.ws_messages import CombinedStreamParser, WsItem
from marketflow.domain.ticks import RejectCounts
from marketflow.simulator.ws_venue import WsVenue

ROUNDS = 40  # each figure is the best of this many runs, taken in turns
BURST = 100  # simulator rounds per burst: 1,000 frames


class _CarefulOnly(CombinedStreamParser):
    def _fast(self, *args: object) -> int | None:
        return None


def frames() -> WsItem:
    venue = WsVenue(port=0, seed=1)
    out: WsItem = []
    for _ in range(BURST):
        out.extend(venue._round().values())
    return out


def runners(burst: WsItem) -> dict[str, Callable[[], object]]:
    pairs = frozenset({"BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"})
    received = time.time_ns() // 1_000_000

    def loads() -> int:
        return len([orjson.loads(f) for f in burst])

    def parse(parser_type: type[CombinedStreamParser]) -> Callable[[], int]:
        def run() -> int:
            p = parser_type("bench", pairs, RejectCounts())
            return p.parse(burst, received).count if not p.rejects.counts else -1

        return run

    return {"orjson_us": loads, "fast_us": parse(CombinedStreamParser),
            "careful_us": parse(_CarefulOnly)}  # fmt: skip


def main() -> None:
    burst = frames()
    best = dict.fromkeys(runners(burst), float("inf"))
    run = runners(burst)
    for _ in range(ROUNDS):
        for name, fn in run.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t) / len(burst) * 1e6)
    figures = {name: round(us, 3) for name, us in best.items()}
    figures["careful_over_fast"] = round(best["careful_us"] / best["fast_us"], 2)
    for name, value in figures.items():
        print(f"{name:>18}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
