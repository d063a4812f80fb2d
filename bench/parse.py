"""Per-tick CPU of the hot path without I/O: parse + validate a 64 KiB chunk, fold it.

    python -m bench.parse

Prints microseconds per tick for the JSON-lines parser and for the aggregator's fold into
per-second buckets (best of five), as a JSON object on the last line.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import msgspec

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.app.aggregator import Aggregator
from marketflow.domain.ticks import RejectCounts, TickBatch
from marketflow.settings import DEFAULT_PAIRS, PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, RecordingSink

TS0 = 1_795_482_633_071


def chunk(lines: int, rng: random.Random) -> bytes:
    """Simulator-shaped lines: 5 pairs per timestamp, full float64 prices."""
    return b"".join(
        b'{"symbol":"%s","price":%r,"timestamp":%d}\n'
        % (DEFAULT_PAIRS[i % 5].encode(), rng.uniform(0.1, 100_000), TS0 + i // 5 * 100)
        for i in range(lines)
    )


def main() -> None:
    from bench.limit import Tick, limit_pass

    data = chunk(900, random.Random(1))  # ~64 KiB
    n_lines = data.count(b"\n")
    parser = JsonLinesParser("exchange1", frozenset(DEFAULT_PAIRS), RejectCounts())
    agg = Aggregator(
        asyncio.Queue(), FakeCache(), RecordingSink(FakeStore()), PipelineSettings(), lambda: TS0
    )
    decoder = msgspec.json.Decoder(list[Tick])
    reps = 200
    best_parse = best_fold = best_limit = float("inf")
    for _ in range(7):  # interleaved with the limit loop: a busy machine slows both alike
        best_limit = min(best_limit, limit_pass(data, reps, decoder) / (reps * n_lines) * 1e6)
        t0 = time.perf_counter()
        batches: list[TickBatch] = [parser.parse(data, TS0) for _ in range(reps)]
        t1 = time.perf_counter()
        for b in batches:
            agg.fold(b)
        t2 = time.perf_counter()
        best_parse = min(best_parse, (t1 - t0) / (reps * n_lines) * 1e6)
        best_fold = min(best_fold, (t2 - t1) / (reps * n_lines) * 1e6)
    from bench.limit import limit_lines_per_s

    limit_us = 1e6 / limit_lines_per_s()
    both = best_parse + best_fold
    print(f"parse+validate {best_parse:.3f} us/tick, fold {best_fold:.3f} us/tick")
    print(f"limit loop {limit_us:.3f} us/line: parse+fold runs at {limit_us / both:.2f} of it")
    print(
        json.dumps(
            {
                "parse_us_per_tick": round(best_parse, 3),
                "fold_us_per_tick": round(best_fold, 3),
                "limit_us_per_line": round(limit_us, 3),
                "ratio_to_limit": round(limit_us / both, 3),
                "lines_per_chunk": n_lines,
            }
        )
    )


if __name__ == "__main__":
    main()
