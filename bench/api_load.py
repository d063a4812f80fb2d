"""bench.api's load and measuring tools: the 50 req/s poller, wrk, tick counts from Redis,
the daemon's CPU time, the machine's CPU pressure and py-spy profiles."""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import aiohttp
import redis.asyncio as aioredis

from bench.ingest import percentile
from tests.e2e.procs import Daemon

POLL_PATHS = (
    "/prices/latest/BTCUSDT",
    "/prices/average/BTCUSDT?period=1m",
    "/prices/highest/ETHUSDT?period=5m",
    "/prices/lowest/slow1/SOLUSDT?period=30s",
    "/prices/latest/slow2/DOGEUSDT",
    "/prices/average/TONUSDT?period=10s",
    "/health",
)
WRK_PATH = "/prices/latest/BTCUSDT"


async def poll(port: int, seconds: float, rate: float = 50.0) -> dict[str, Any]:
    """Open-loop polling: one request every 1/rate s across POLL_PATHS, each timed alone."""
    latencies: list[float] = []
    by_path: dict[str, list[float]] = {}
    lag: list[float] = []
    cpu_lag: list[float] = []
    errors: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{port}", connector=conn, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:

        async def one(path: str) -> None:
            t0 = time.perf_counter()
            try:
                async with session.get(path) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            ms = (time.perf_counter() - t0) * 1000
            latencies.append(ms)
            by_path.setdefault(path, []).append(ms)
            if status >= 500 or (status != 200 and "/health" not in path):
                errors[str(status)] = errors.get(str(status), 0) + 1
            if path == "/health":
                doc = json.loads(body)["loop_lag"]
                lag.append(float(doc["max_ms"]))
                cpu_lag.append(float(doc["cpu_max_ms"]))

        start = time.perf_counter()
        n = int(seconds * rate)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(POLL_PATHS[i % len(POLL_PATHS)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return {
        "requests": n,
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies, default=math.nan), 2),
        "loop_lag_max_ms": max(lag, default=math.nan),
        "loop_lag_cpu_max_ms": max(cpu_lag, default=math.nan),
        "errors": errors,
        "max_ms_by_path": {p: round(max(v), 1) for p, v in by_path.items()},
    }


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_LAT = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)


def wrk(port: int, seconds: float, connections: int) -> dict[str, Any]:
    """``wrk`` against WRK_PATH (this process's CPUs: never the daemon's)."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            f"http://127.0.0.1:{port}{WRK_PATH}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = _RPS.search(out)
    assert rps is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    lat = {f"p{q}_ms": round(float(v) * scale[u], 2) for q, v, u in _LAT.findall(out)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "req_per_s": round(float(rps.group(1))),
        **lat,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


async def redis_ticks(url: str, exchanges: tuple[str, ...], first_s: int, last_s: int) -> int:
    """Ticks of ``exchanges`` whose exchange second is in [first_s, last_s], from the
    per-second window hashes in Redis (counted independently of the daemon's counters)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    total = 0
    try:
        for ex in exchanges:
            async for key in client.scan_iter(match=f"marketflow:window:{ex}:*", count=1000):
                minute_s = int(key.rsplit(":", 1)[1])
                if minute_s + 60 <= first_s or minute_s > last_s:
                    continue
                for sec, raw in (await client.hgetall(key)).items():
                    if first_s <= int(sec) <= last_s:
                        total += int(cast(str, raw).rsplit(",", 1)[1])  # decoded
    finally:
        await client.aclose()
    return total


@contextmanager
def profiled(daemon: Daemon, out_dir: Path | None, name: str) -> Iterator[None]:
    """With ``--profile DIR``: py-spy samples the daemon over the block (collapsed stacks)."""
    if out_dir is None or daemon.proc is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "250",
         "--nonblocking", "-p", str(daemon.proc.pid), "-o", str(out_dir / f"{name}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


def cpu_pressure() -> float | None:
    """The share of the last 60 s some runnable task waited for a CPU (Linux PSI): how much
    else ran on this machine meanwhile."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return float(line.split("avg60=")[1].split()[0]) / 100
