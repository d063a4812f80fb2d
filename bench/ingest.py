"""Ingest benchmark: firehoses -> the daemon (one core) -> real Redis and PostgreSQL.

    python -m bench.ingest [--sources 2] [--pairs 5] [--latency-rate 100000] [--rate 0]
                           [--seconds 15] [--fill] [--profile FILE]

Prints, from one run: the limit loop (bench.limit, on the daemon's core before the daemon
starts and again after it stopped; the ratio is to the faster of the two); tick -> Redis
latency p50/p99/max while the senders offer ``--latency-rate`` ticks/s in all; then, the
senders replaced by saturating ones on the same ports, the daemon's end-to-end ticks/s and its
ratio to the limit loop, the daemon's RSS, and ticks counted back from what was stored.

- The daemon runs as its own process pinned to CPU 0 (when the machine has two or more);
  the senders (bench.firehose: pre-rendered lines, restamped, tens of ns a line), Redis,
  PostgreSQL and this process share the other CPUs. ``--rate 0`` saturates: TCP flow
  control throttles the senders to what the daemon sustains.
- Throughput is counted back from the store: after the measured interval the senders stop,
  the daemon is stopped with SIGTERM (it writes the open minutes), and the ticks whose
  exchange second lies inside the interval are summed from the minute rows' per-second
  parts in PostgreSQL. The daemon's own count (/health ``ticks``), the rows' total and the
  Redis window's total are printed beside it: all three must agree.
- Latency is exchange timestamp -> readable in Redis, from this process's own poller
  (``HMGET marketflow:latest`` every 0.5 ms: a tight loop would starve Redis, on the same
  core). When a pair's latest timestamp moves from t0 to t1 at poll time T, every
  millisecond stamp s in (t0, t1] became readable by T: one sample T - s per millisecond
  (the senders stamp at a constant rate), so the flush wait of the oldest tick of a flush
  counts, not only the freshest. Stamps are whole milliseconds (up to 1 ms added) and polls
  0.5 ms apart: both bias it upward.
- ``--fill`` first sends one round per second of exchange time over the whole retention
  (600 s), so the RSS printed is with every retained (exchange, pair, second) present; the
  measured phase starts once the daemon has caught up with that backfill (each sender's
  first pair readable in Redis within 5 s of the wall clock).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.firehose import pair_names
from bench.limit import limit_lines_per_s
from marketflow.adapters.minute_codec import decode_seconds
from tests.e2e.procs import Daemon
from tests.harness.services import PostgresServer, RedisServer, free_port

RETENTION_S = 600
POLL_S = 0.0005


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


class Firehose:
    def __init__(
        self, pairs: int, rate: float, fill_s: int, port: int | None = None, quotes: bool = False
    ) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.firehose", "--port", str(self.port),
             "--pairs", str(pairs), "--rate", str(rate), "--fill-s", str(fill_s),
             *(["--quotes"] if quotes else [])],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith(b"listening"), line

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


async def latest_values(client: aioredis.Redis, fields: list[str]) -> list[bytes | str | None]:
    """``marketflow:latest`` of ``fields``; while Redis runs a long script (a refill of
    everything after the daemon saw it fail: BUSY), the poll waits and asks again."""
    while True:
        try:
            values: list[bytes | str | None] = await client.hmget("marketflow:latest", fields)
        except ResponseError as exc:
            if not str(exc).startswith("BUSY"):
                raise
            print(f"redis busy: {exc}", file=sys.stderr)
            await asyncio.sleep(0.1)
        else:
            return values


async def sample_latency(url: str, fields: list[str], seconds: float) -> list[float]:
    client = aioredis.Redis.from_url(url)
    seen: dict[str, int] = {}
    out: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            values = await latest_values(client, fields)
            now_ms = time.time() * 1000
            for field, raw in zip(fields, values, strict=True):
                if raw is None:
                    continue
                ts = int(orjson.loads(raw)["timestamp"])
                prev = seen.get(field)
                seen[field] = ts
                if prev is None or ts <= prev:
                    continue
                out.extend(now_ms - s for s in range(max(prev + 1, ts - 1000), ts + 1))
            await asyncio.sleep(POLL_S)  # a tight loop would starve Redis on its shared core
    finally:
        await client.aclose()
    return out


async def caught_up(url: str, fields: list[str], deadline: float, since_ms: float) -> None:
    """Wait until each field of ``marketflow:latest`` holds a tick stamped at ``since_ms``
    or later, i.e. past the retention backfill (every backfill line is stamped before its
    sender connected), or ``deadline`` (monotonic) passes. Not "within N s of the wall
    clock": a saturated daemon lags by what its bounded queues hold, which says nothing
    about the backfill."""
    client = aioredis.Redis.from_url(url)
    try:
        while time.monotonic() < deadline:
            values = await latest_values(client, fields)
            if all(v is not None and orjson.loads(v)["timestamp"] >= since_ms for v in values):
                return
            await asyncio.sleep(1.0)
    finally:
        await client.aclose()


async def counted_back(dsn: str, url: str, s0: int, s1: int) -> dict[str, int]:
    """Ticks in the stored rows (all, and those of seconds s0 <= s < s1) and in Redis."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT (extract(epoch FROM timestamp) * 1000)::bigint AS m, tick_count, seconds "
            "FROM minute_prices"
        )
    finally:
        await conn.close()
    stored = inside = 0
    for r in rows:
        stored += r["tick_count"]
        for s, _lo, _hi, _tot, n in decode_seconds(r["m"], r["seconds"]) or ():
            if s0 <= s < s1:
                inside += n
    client = aioredis.Redis.from_url(url)
    cached = 0
    try:
        async for key in client.scan_iter(match="marketflow:window:*", count=1000):
            values = await client.hgetall(key)
            for v in values.values():
                text = v.decode() if isinstance(v, bytes) else v
                cached += int(text.rsplit(",", 1)[1])
    finally:
        await client.aclose()
    return {"stored": stored, "stored_inside": inside, "cached": cached}


def ticks(daemon: Daemon) -> int:
    return int(daemon.get("/health")[1]["ticks"])


def settle(daemon: Daemon, timeout: float = 120, quiet_s: float = 3.0) -> int:
    """The daemon's tick count once the senders have stopped and the backlog has drained:
    every queue empty and the count unchanged for ``quiet_s`` (one long flush at 500 x 10
    pairs must not pass for the end)."""
    last, since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = daemon.get("/health")[1]
        n, queued = int(health["ticks"]), sum(health.get("queues", {}).values())
        now = time.monotonic()
        if n != last or queued:
            last, since = n, now
        elif now - since >= quiet_s:
            return n
        time.sleep(0.25)
    return last


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline_overrides(items: list[str]) -> dict[str, float]:
    """``KEY=VALUE`` pairs of numeric [pipeline] settings."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--pipeline {item!r}: expected KEY=VALUE")
        out[key] = float(value) if "." in value else int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest")
    ap.add_argument("--sources", type=int, default=2, help="exchanges (one firehose each)")
    ap.add_argument("--pairs", type=int, default=5, help="pairs per exchange")
    ap.add_argument("--rate", type=float, default=0, help="lines/s per source; 0: saturate")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument(
        "--latency-rate", type=float, default=100_000,
        help="first, tick->Redis latency at this total lines/s (0: skip)",
    )  # fmt: skip
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--fill", action="store_true", help="fill the 600 s retention first")
    ap.add_argument(
        "--pipeline",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [pipeline] setting for the daemon (repeatable), e.g. parse_pass_budget_ms=0",
    )
    ap.add_argument("--profile", type=Path, help="py-spy raw profile of the daemon to FILE")
    ap.add_argument("--daemon-log", type=Path, help="keep the daemon's log in FILE")
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    daemon_cpus = {cpus[0]} if len(cpus) > 1 else set(cpus)
    other_cpus = set(cpus[1:]) or set(cpus)
    pin(0, daemon_cpus)
    limit_before = limit_lines_per_s()
    pin(0, other_cpus)
    pairs = pair_names(args.pairs)
    with tempfile.TemporaryDirectory() as tmp_dir, PostgresServer() as pg, RedisServer() as rd:
        tmp = Path(tmp_dir)
        first_rate = args.latency_rate / args.sources if args.latency_rate else args.rate
        hoses = [
            Firehose(args.pairs, first_rate, RETENTION_S if args.fill else 0)
            for _ in range(args.sources)
        ]
        config: dict[str, Any] = {
            "http": {"host": "127.0.0.1", "port": 0},
            "postgres": {"dsn": pg.dsn},
            "redis": {"url": rd.url},
            "embedded": {"data_dir": str(tmp / "var")},
            "pipeline": {"window_retention_s": RETENTION_S} | pipeline_overrides(args.pipeline),
            "capture": {"enabled": False, "port": free_port()},
            "log_level": "INFO" if args.daemon_log else "WARNING",
            "pairs": pairs,
            "exchanges": [{"name": f"ex{i + 1}", "port": h.port} for i, h in enumerate(hoses)],
        }
        daemon = Daemon(tmp, config)
        daemon.start()
        assert daemon.proc is not None
        pin(daemon.proc.pid, daemon_cpus)
        fields = [f"ex{i + 1}:{pairs[0]}" for i in range(args.sources)]
        profiler = None
        paced: list[float] = []
        paced_cpu = 0.0
        try:
            time.sleep(args.warmup + (5 if args.fill else 0))
            if args.fill:  # measure past the backfill: every sender's first pair is live
                since_ms = time.time() * 1000  # the senders connected (and backfilled) before
                asyncio.run(caught_up(rd.url, fields, time.monotonic() + 900, since_ms))
            if args.latency_rate:
                p0, pc0 = time.time(), cpu_s(daemon.proc.pid)
                paced = asyncio.run(sample_latency(rd.url, fields, args.latency_seconds))
                paced_cpu = (cpu_s(daemon.proc.pid) - pc0) / (time.time() - p0)
                paced_rss = rss_mb(daemon.proc.pid)
                paced_health = daemon.get("/health")[1]
                for h in hoses:  # the same ports: the daemon reconnects to the saturating ones
                    h.stop()
                hoses = [Firehose(args.pairs, args.rate, 0, h.port) for h in hoses]
                time.sleep(args.warmup)
            if args.profile:
                profiler = subprocess.Popen(
                    [sys.executable.replace("python", "py-spy").rsplit("/", 1)[0] + "/py-spy",
                     "record", "-p", str(daemon.proc.pid), "-d", str(int(args.seconds)),
                     "-r", "200", "-f", "raw", "-o", str(args.profile), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            t0, n0, c0 = time.time(), ticks(daemon), cpu_s(daemon.proc.pid)
            latencies = asyncio.run(sample_latency(rd.url, fields, args.seconds))
            t1, n1, c1 = time.time(), ticks(daemon), cpu_s(daemon.proc.pid)
            rss = rss_mb(daemon.proc.pid)
            # The longest the loop was held over the last 1-2 s of saturation (loop_health).
            saturated_health = daemon.get("/health")[1]
            lag = saturated_health.get("loop_lag", {})
            gc_stats = saturated_health.get("gc", {})
            for h in hoses:
                h.stop()
            folded = settle(daemon)
            health = daemon.get("/health")[1]
        finally:
            if profiler is not None:
                profiler.wait(60)
            daemon.stop()
            if args.daemon_log:
                shutil.copyfile(daemon.log_path, args.daemon_log)
            for h in hoses:
                if h.proc.poll() is None:
                    h.stop()
        # Again once the daemon is gone, on its core: this machine's speed drifts by tens of
        # percent over minutes, so the ratio is taken to the faster of the two (the stricter).
        pin(0, daemon_cpus)
        limit_after = limit_lines_per_s()
        pin(0, other_cpus)
        limit = max(limit_before, limit_after)
        s0, s1 = math.ceil(t0), math.floor(t1)
        back = asyncio.run(counted_back(pg.dsn, rd.url, s0, s1))
    stored_rate = back["stored_inside"] / (s1 - s0)
    paced_stats = {}
    if paced:
        paced_stats = {
            "paced_total_rate": args.latency_rate,
            "paced_p50_ms": round(percentile(paced, 0.50), 2),
            "paced_p99_ms": round(percentile(paced, 0.99), 2),
            "paced_max_ms": round(max(paced), 2),
            "paced_samples": len(paced),
            "paced_rss_mb": round(paced_rss, 1),
            "paced_daemon_cpu": round(paced_cpu, 3),
            "paced_pipeline": paced_health.get("pipeline"),
            "paced_loop_lag": paced_health.get("loop_lag"),
        }
    result = {
        **paced_stats,
        "ticks_per_s": round(stored_rate),
        "limit_lines_per_s": round(limit),
        "limit_before_after": [round(limit_before), round(limit_after)],
        "ratio": round(stored_rate / limit, 3),
        "health_ticks_per_s": round((n1 - n0) / (t1 - t0)),
        "daemon_cpu": round((c1 - c0) / (t1 - t0), 3),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2) if latencies else None,
        "rss_mb": round(rss, 1),
        "saturated_loop_lag_max_ms": lag.get("max_ms"),
        "saturated_loop_lag_cpu_max_ms": lag.get("cpu_max_ms"),
        "gc_max_ms_by_generation": gc_stats.get("max_ms_by_generation"),
        "gc_collections": gc_stats.get("collections"),
        "sources": args.sources,
        "pairs": args.pairs,
        "offered_rate_per_source": args.rate or "saturate",
        "seconds": s1 - s0,
        "latency_samples": len(latencies),
        "folded_total": folded,
        **back,
        "rejected": sum(e["rejected"] for e in health["exchanges"].values()),
        "late": health.get("late_ticks"),
        "daemon_cpus": sorted(daemon_cpus),
    }
    print(
        f"limit loop {limit:,.0f} lines/s on CPU {sorted(daemon_cpus)} (the faster of before"
        f" the daemon, {limit_before:,.0f}, and after it, {limit_after:,.0f})"
    )
    if paced:
        print(
            f"at {args.latency_rate:,.0f} ticks/s: tick->Redis p50 {paced_stats['paced_p50_ms']}"
            f" ms p99 {paced_stats['paced_p99_ms']} ms max {paced_stats['paced_max_ms']} ms"
            f" ({len(paced):,} samples); rss {paced_rss:.0f} MB; daemon CPU {paced_cpu:.0%}"
        )
    print(
        f"daemon: {stored_rate:,.0f} ticks/s counted back from PostgreSQL over {s1 - s0} s "
        f"= {stored_rate / limit:.2f} of the limit loop ({args.sources} x {args.pairs} pairs;"
        f" daemon CPU {result['daemon_cpu']:.0%})"
    )
    print(
        f"saturated (queueing in socket buffers): tick->Redis p50 {result['p50_ms']} ms "
        f"p99 {result['p99_ms']} ms; rss {rss:.0f} MB; loop held at most"
        f" {lag.get('max_ms')} ms ({lag.get('cpu_max_ms')} ms of it on CPU) over its last 1-2 s"
    )
    print(
        f"GC since start: collections per generation {gc_stats.get('collections')}, longest"
        f" pause per generation {gc_stats.get('max_ms_by_generation')} ms"
    )
    print(
        f"counted back: folded {folded:,} = stored {back['stored']:,} = cached {back['cached']:,}"
        f" ({'agree' if folded == back['stored'] == back['cached'] else 'DISAGREE'})"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
