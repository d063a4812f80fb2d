"""The limit loop: what one core does with reference-format lines and nothing else.

    python -m bench.limit

Over 64 KiB chunks of ``{"symbol":..,"price":..,"timestamp":..}`` lines: join the chunk into
one JSON array, decode it with ``msgspec.json.Decoder(list[Tick])`` and fold each tick inline
into a dict keyed by (symbol, epoch second) holding ``[low, high, sum, count]``. Best of 5,
as issue 12 defines it (a shared machine steals time from single passes; the best pass is the
loop itself).
Every ingest figure is quoted as a ratio to this, measured in the same run: absolute figures
differ between machines by 2x, the ratio does not.
"""

from __future__ import annotations

import json
import random
import time

import msgspec

from bench.parse import chunk


class Tick(msgspec.Struct):
    symbol: str
    price: float
    timestamp: int


def limit_pass(data: bytes, chunks: int, decoder: msgspec.json.Decoder[list[Tick]]) -> float:
    """Seconds for one pass of the limit loop over ``chunks`` copies of ``data``."""
    folded: dict[tuple[str, int], list[float]] = {}
    t0 = time.perf_counter()
    for _ in range(chunks):
        ticks = decoder.decode(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]")
        for t in ticks:
            key = (t.symbol, t.timestamp // 1000)
            b = folded.get(key)
            p = t.price
            if b is None:
                folded[key] = [p, p, p, 1]
            else:
                if p < b[0]:
                    b[0] = p
                if p > b[1]:
                    b[1] = p
                b[2] += p
                b[3] += 1
    return time.perf_counter() - t0


def reference_chunk() -> bytes:
    return chunk(900, random.Random(1))


def limit_lines_per_s(chunks: int = 200, rounds: int = 5) -> float:
    """Best of ``rounds`` passes over ``chunks`` 64 KiB chunks, in lines per second."""
    data = reference_chunk()
    decoder = msgspec.json.Decoder(list[Tick])
    best = min(limit_pass(data, chunks, decoder) for _ in range(rounds))
    return chunks * data.count(b"\n") / best


def main() -> None:
    rate = limit_lines_per_s()
    print(f"limit loop {rate:,.0f} lines/s (msgspec array decode + inline fold, best of 5)")
    print(json.dumps({"limit_lines_per_s": round(rate)}))


if __name__ == "__main__":
    main()
