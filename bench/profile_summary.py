"""Where each microsecond of a tick goes, from a py-spy raw profile of the daemon.

    python -m bench.ingest --profile /tmp/daemon.txt      # prints ticks_per_s
    python -m bench.profile_summary /tmp/daemon.txt --ticks-per-s 900000

Each sample is charged to the first stage found walking its stack from the innermost frame
outward (so a parse inside a worker counts as parsing, not as the worker's queue), and the
stage's share of the samples times one core's time per tick (1 / ticks_per_s, the daemon
being pinned to one core and saturated) gives microseconds per tick.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

# (stage, markers in a frame "function (file:line)"), innermost match wins.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode (msgspec / orjson)", ("_typed_piece", "_decode_lines", "orjson")),
    ("fold in the parser", ("JsonLinesParser._fold", "fold_points", "_typed_chunk")),
    ("validate per tick (orjson path)", ("JsonLinesParser._validate",)),
    ("join / line handling", ("_array_of", "JsonLinesParser.parse")),
    ("merge into windows", ("Aggregator.fold", "PairWindow.add")),
    ("flush: build + Redis encode", ("Aggregator.flush", "RedisPriceCache", "redis/")),
    ("minute rows + PostgreSQL", ("MinuteWriter", "minute_store", "asyncpg")),
    ("socket reads", ("TcpJsonProducer", "StreamReader", "streams.py")),
    ("queues + workers", ("RunningSource._work", "queues.py", "Aggregator.consume")),
    ("HTTP / health", ("aiohttp", "entrypoints/http")),
)


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, markers in STAGES:
            if any(m in frame for m in markers):
                return stage
    return "event loop, other"


def summarize(path: Path) -> tuple[int, collections.Counter[str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        counts[stage_of(stack.split(";"))] += int(n)
    return total, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    ap.add_argument("profile", type=Path)
    ap.add_argument("--ticks-per-s", type=float, required=True)
    args = ap.parse_args(argv)
    total, counts = summarize(args.profile)
    us_per_tick = 1e6 / args.ticks_per_s
    out = {}
    print(f"{total} samples; {us_per_tick:.3f} us of one core per tick")
    for stage, n in counts.most_common():
        share = n / total
        out[stage] = round(share * us_per_tick, 3)
        print(f"{share:6.1%}  {share * us_per_tick:6.3f} us  {stage}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
