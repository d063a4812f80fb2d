"""Ingest benchmark: simulator firehoses -> the daemon (one core) -> real Redis and PostgreSQL.

    python -m bench.ingest [--simulators 2] [--rate 200000] [--seconds 15]

The daemon runs as its own process pinned to CPU 0 (when the machine has two or more),
simulators and this measuring process to the other CPUs. Throughput is the daemon's own count
of ticks folded (from /health) over the measured interval: TCP flow control throttles the
simulators to what the daemon sustains. Latency is exchange timestamp -> visible in Redis:
the ``marketflow:latest`` hash is polled every 5 ms; when a pair's latest timestamp moves
from t0 to t1 at poll time T, the ticks that became visible with it were stamped between t0
and t1 (a firehose stamps them evenly), so ten samples T - t are taken spread over (t0, t1].
That counts the wait for the next flush of the oldest tick of an interval, not only the
freshest one. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from tests.e2e.procs import Daemon, Simulator
from tests.harness.services import PostgresServer, RedisServer, free_port


def pin(pid: int, cpus: set[int]) -> None:
    if hasattr(os, "sched_setaffinity") and cpus:
        os.sched_setaffinity(pid, cpus)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def sample_latency(url: str, seconds: float) -> list[float]:
    client = aioredis.Redis.from_url(url)
    seen: dict[bytes | str, int] = {}
    out: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            entries = await client.hgetall("marketflow:latest")
            now_ms = time.time() * 1000
            for key, raw in entries.items():
                ts = int(orjson.loads(raw)["timestamp"])
                prev = seen.get(key)
                if prev == ts:
                    continue
                seen[key] = ts
                if prev is None or prev > ts:
                    continue
                out.extend(now_ms - (prev + (ts - prev) * k / 10) for k in range(1, 11))
            await asyncio.sleep(0.005)
    finally:
        await client.aclose()
    return out


def ticks(daemon: Daemon) -> int:
    return int(daemon.get("/health")[1]["ticks"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest")
    ap.add_argument("--simulators", type=int, default=2)
    ap.add_argument("--rate", type=int, default=200_000, help="lines/s per simulator")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--flush-ms", type=int, default=20)
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    daemon_cpus = {cpus[0]} if len(cpus) > 1 else set(cpus)
    other_cpus = set(cpus[1:]) or set(cpus)
    pin(0, other_cpus)
    with tempfile.TemporaryDirectory() as tmp_dir, PostgresServer() as pg, RedisServer() as rd:
        tmp = Path(tmp_dir)
        sims = [
            Simulator(tmp, f"exchange{i + 1}", "json", "--rate", str(args.rate))
            for i in range(args.simulators)
        ]
        for s in sims:
            s.start()
            assert s.proc is not None
            pin(s.proc.pid, other_cpus)
        config: dict[str, Any] = {
            "http": {"host": "127.0.0.1", "port": 0},
            "postgres": {"dsn": pg.dsn},
            "redis": {"url": rd.url},
            "embedded": {"data_dir": str(tmp / "var")},
            "pipeline": {"flush_interval_ms": args.flush_ms},
            "capture": {"enabled": False, "port": free_port()},
            "log_level": "WARNING",
            "exchanges": [{"name": s.name, "port": s.port} for s in sims],
        }
        daemon = Daemon(tmp, config)
        daemon.start()
        assert daemon.proc is not None
        pin(daemon.proc.pid, daemon_cpus)
        try:
            time.sleep(args.warmup)
            t0, n0 = time.monotonic(), ticks(daemon)
            latencies = asyncio.run(sample_latency(rd.url, args.seconds))
            t1, n1 = time.monotonic(), ticks(daemon)
            rss = rss_mb(daemon.proc.pid)
            health = daemon.get("/health")[1]
        finally:
            daemon.stop()
            for s in sims:
                s.stop()
    rate = (n1 - n0) / (t1 - t0)
    result = {
        "ticks_per_s": round(rate),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "rss_mb": round(rss, 1),
        "simulators": args.simulators,
        "offered_rate_per_simulator": args.rate,
        "seconds": args.seconds,
        "latency_samples": len(latencies),
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        "rejected": sum(e["rejected"] for e in health["exchanges"].values()),
        "daemon_cpus": sorted(daemon_cpus),
    }
    print(
        f"daemon sustained {rate:,.0f} ticks/s on CPU {sorted(daemon_cpus)}; "
        f"tick->Redis p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms; rss {rss:.0f} MB"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
