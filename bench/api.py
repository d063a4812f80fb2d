"""API benchmark: the REST API's latency and req/s, idle and while the daemon ingests.

    python -m bench.api [--seconds 10] [--wrk-seconds 10] [--target-rate 100000]

Real PostgreSQL and Redis (the test harness's throwaway servers), JSON simulators and the
daemon as its own process pinned to CPU 0 (simulators, wrk, the servers and this process on
the other CPUs, the simulators niced so the measuring clients come first). Two slow
simulators keep prices flowing all the time; two firehose simulators are started only for
the load phases (the daemon reconnects to them), so one daemon sees every phase:

1. idle: 50 req/s polling (open loop: a request every 20 ms, whatever the answers do) across
   /prices/latest, /prices/average, /prices/highest, /prices/lowest (with ?period=) and
   /health: p50/p99/max; then ``wrk`` against /prices/latest/BTCUSDT: idle req/s.
2. saturated: ``bench.firehose`` senders (pre-rendered lines, tens of ns a line) as fast as
   the daemon reads (``--saturate-rate 0``, the default; the simulators' Python price walk
   tops out near 400,000 lines/s each, below what the daemon takes on a fast machine); the
   same polling, and the daemon's CPU share (~100%: saturated).
3. ~``--target-rate`` ticks/s from the firehoses: ``wrk`` again, and the ingest rate achieved
   meanwhile (the daemon's /health ``ticks`` delta, and the ticks Redis holds for those
   seconds of exchange time), against the rate without wrk.
4. the daemon restarted with CPython's default GC thresholds, saturated again: GC pauses,
   loop lag and throughput against the raised threshold (``pipeline.gc_gen0_threshold``).

Loop lag is the daemon's own /health ``loop_lag.max_ms`` (sampled by the polling), GC pauses
its ``gc`` figures. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.api_load import WRK_PATH, cpu_pressure, poll, profiled, redis_ticks, wrk
from bench.ingest import Firehose, cpu_s, pin, pipeline_overrides
from tests.e2e.procs import Daemon, Simulator
from tests.harness.services import PostgresServer, RedisServer, free_port

SLOW = ("slow1", "slow2")
FIRE_PAIRS = 5  # bench.firehose's pairs: the daemon's five defaults (no pairs configured)
FIRE = ("fire1", "fire2")


class Stack:
    """PostgreSQL, Redis, the slow simulators and the daemon; firehoses on demand."""

    def __init__(self, tmp: Path, pg: PostgresServer, rd: RedisServer, cpus: list[int]) -> None:
        self.tmp, self.pg, self.rd = tmp, pg, rd
        self.daemon_cpus = {cpus[0]} if len(cpus) > 1 else set(cpus)
        self.other_cpus = set(cpus[1:]) or set(cpus)
        self.fire_ports = {name: free_port() for name in FIRE}
        self.slow = [Simulator(tmp, name, "json", "--rate", "50") for name in SLOW]
        self.fire: list[Simulator | Firehose] = []
        self.daemon: Daemon | None = None

    def _nice(self, sim: Simulator | Firehose, niceness: int = 15) -> None:
        """Off the daemon's CPU, behind the measuring clients and the servers there."""
        assert sim.proc is not None
        pin(sim.proc.pid, self.other_cpus)
        os.setpriority(os.PRIO_PROCESS, sim.proc.pid, niceness)

    def start_daemon(
        self, gc_gen0: int, read_chunk_bytes: int = 65536, pipeline: dict[str, float] | None = None
    ) -> Daemon:
        if not self.slow[0].proc:
            for s in self.slow:
                s.start()
                self._nice(s)
        exchanges = [{"name": s.name, "port": s.port} for s in self.slow]
        exchanges += [{"name": n, "port": p} for n, p in self.fire_ports.items()]
        config: dict[str, Any] = {
            "http": {"host": "127.0.0.1", "port": 0},
            "postgres": {"dsn": self.pg.dsn},
            "redis": {"url": self.rd.url},
            "embedded": {"data_dir": str(self.tmp / "var")},
            "pipeline": {
                "reconnect_initial_s": 0.2,
                "reconnect_max_s": 0.5,  # a firehose started later is read within 0.5 s
                "gc_gen0_threshold": gc_gen0,
                "read_chunk_bytes": read_chunk_bytes,
            }
            | (pipeline or {}),
            "capture": {"enabled": False, "port": free_port()},
            "log_level": "WARNING",
            "exchanges": exchanges,
        }
        self.daemon = Daemon(self.tmp, config)
        self.daemon.start()
        assert self.daemon.proc is not None
        pin(self.daemon.proc.pid, self.daemon_cpus)
        return self.daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def start_fire(self, rate_per_sim: int, niceness: int = 15) -> None:
        """Firehoses, niced: they must not take the other CPU from wrk and the poller (under
        heavy outside load a paced one can then fall below its rate: the bench prints the
        rate achieved)."""
        self.stop_fire()
        for name, port in self.fire_ports.items():
            # On the port the daemon is configured with (it reconnects to it).
            sim: Simulator | Firehose
            if rate_per_sim <= 0:  # as fast as the daemon reads
                sim = Firehose(FIRE_PAIRS, 0, 0, port)
            else:
                sim = Simulator(self.tmp, name, "json", "--rate", str(rate_per_sim), port=port)
                sim.start()
            self._nice(sim, niceness)
            self.fire.append(sim)

    def stop_fire(self) -> None:
        for s in self.fire:
            s.stop()
        self.fire = []

    def stop(self) -> None:
        self.stop_daemon()
        self.stop_fire()
        for s in self.slow:
            if s.proc is not None:
                s.stop()


def health(daemon: Daemon) -> dict[str, Any]:
    body: dict[str, Any] = daemon.get("/health")[1]
    return body


def fire_ticks(doc: dict[str, Any]) -> int:
    return sum(int(doc["exchanges"].get(n, {}).get("ticks", 0)) for n in FIRE)


def wait_connected(daemon: Daemon, names: tuple[str, ...], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ex = health(daemon)["exchanges"]
        if all(ex.get(n, {}).get("connected") for n in names):
            return
        time.sleep(0.1)
    raise AssertionError(f"{names} not connected:\n{daemon.log()[-2000:]}")


@contextmanager
def measured(daemon: Daemon) -> Iterator[dict[str, Any]]:
    """Over the block: the daemon's fire-exchange tick delta per second, its CPU share."""
    assert daemon.proc is not None
    out: dict[str, Any] = {}
    h0, t0, w0, c0 = health(daemon), time.monotonic(), time.time(), cpu_s(daemon.proc.pid)
    yield out
    h1, t1, w1, c1 = health(daemon), time.monotonic(), time.time(), cpu_s(daemon.proc.pid)
    out["ticks_per_s"] = round((fire_ticks(h1) - fire_ticks(h0)) / (t1 - t0))
    out["daemon_cpu"] = round((c1 - c0) / (t1 - t0), 2)
    out["wall"] = (w0, w1)
    out["gc"] = h1["gc"]
    out["gc_collections_per_s"] = [
        round((b - a) / (t1 - t0))
        for a, b in zip(h0["gc"]["collections"], h1["gc"]["collections"], strict=True)
    ]
    out["loop_lag_max_ms_ever"] = h1["loop_lag"]["max_ms_ever"]
    out["gc_ms_per_s"] = round((h1["gc"]["total_ms"] - h0["gc"]["total_ms"]) / (t1 - t0), 1)


def saturated(stack: Stack, daemon: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    stack.start_fire(args.saturate_rate)
    wait_connected(daemon, FIRE)
    time.sleep(args.warmup)
    with measured(daemon) as ing, profiled(daemon, args.profile, f"saturated-gc{args.gc_now}"):
        lat = asyncio.run(poll(daemon.port, args.seconds))
    stack.stop_fire()
    return {"poll": lat, "ingest_ticks_per_s": ing["ticks_per_s"], "gc": ing["gc"],
            "daemon_cpu": ing["daemon_cpu"], "gc_ms_per_s": ing["gc_ms_per_s"],
            "gc_collections_per_s": ing["gc_collections_per_s"]}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    pin(0, set(cpus[1:]) or set(cpus))
    overrides = pipeline_overrides(args.pipeline)
    res: dict[str, Any] = {
        "cpus": len(cpus),
        "pipeline": overrides,
        "cpu_pressure_before": cpu_pressure(),
        "read_chunk_bytes": args.read_chunk_bytes,
    }
    with tempfile.TemporaryDirectory() as tmp_dir, PostgresServer() as pg, RedisServer() as rd:
        stack = Stack(Path(tmp_dir), pg, rd, cpus)
        try:
            args.gc_now = args.gc_gen0
            d = stack.start_daemon(args.gc_gen0, args.read_chunk_bytes, overrides)
            wait_connected(d, SLOW)
            time.sleep(args.warmup)
            with profiled(d, args.profile, "idle-poll"):
                idle_poll = asyncio.run(poll(d.port, args.seconds))
            with profiled(d, args.profile, "idle-wrk"), measured(d) as idle_m:
                idle_wrk = wrk(d.port, args.wrk_seconds, args.connections)
            res["idle"] = {"poll": idle_poll, "wrk": idle_wrk, "daemon_cpu": idle_m["daemon_cpu"]}
            res["saturated"] = saturated(stack, d, args)
            stack.start_fire(args.target_rate // len(FIRE))
            wait_connected(d, FIRE)
            time.sleep(args.warmup)
            with measured(d) as alone, profiled(d, args.profile, "ingesting-alone"):
                time.sleep(args.wrk_seconds)
            with measured(d) as during, profiled(d, args.profile, "ingesting-wrk"):
                w = wrk(d.port, args.wrk_seconds, args.connections)
            time.sleep(1.5)  # the seconds of the interval reach Redis (flush + a late second)
            first_s, last_s = math.ceil(during["wall"][0]), math.floor(during["wall"][1]) - 1
            in_redis = asyncio.run(redis_ticks(rd.url, FIRE, first_s, last_s))
            stack.stop_fire()
            res["ingesting"] = {
                "offered_ticks_per_s": args.target_rate,
                "ingest_ticks_per_s_without_wrk": alone["ticks_per_s"],
                "daemon_cpu_without_wrk": alone["daemon_cpu"],
                "daemon_cpu_during_wrk": during["daemon_cpu"],
                "ingest_ticks_per_s_during_wrk": during["ticks_per_s"],
                "ingest_ticks_per_s_during_wrk_redis": round(
                    in_redis / max(1, last_s - first_s + 1)
                ),
                "wrk": w,
            }
            idle_w, idle_cpu = res["idle"]["wrk"]["req_per_s"], res["idle"]["daemon_cpu"]
            res["idle"]["cpu_us_per_request"] = round(idle_cpu / max(1, idle_w) * 1e6, 1)
            res["ingesting"]["req_per_s_vs_idle"] = round(w["req_per_s"] / idle_w, 3)
            # What the ratio would be had the daemon had its core to itself in both phases
            # (req/s per CPU-second: on a shared machine its CPU share varies from phase
            # to phase).
            # And from CPU accounting alone (robust to wrk's own share of the other CPU): the
            # core less what ingest alone took, over the CPU per request while ingesting.
            ing_cpu = alone["daemon_cpu"] * during["ticks_per_s"] / max(1, alone["ticks_per_s"])
            http_cpu_per_req = max(1e-9, during["daemon_cpu"] - ing_cpu) / max(1, w["req_per_s"])
            res["ingesting"]["cpu_us_per_request"] = round(http_cpu_per_req * 1e6, 1)
            res["ingesting"]["capacity_vs_idle_from_cpu"] = round(
                (1 - ing_cpu) / http_cpu_per_req / (idle_w / max(0.01, idle_cpu)), 3
            )
            res["ingesting"]["req_per_cpu_s_vs_idle"] = round(
                (w["req_per_s"] / max(0.01, during["daemon_cpu"])) / (idle_w / max(0.01, idle_cpu)),
                3,
            )
            stack.stop_daemon()
            if args.compare_default_gc:
                args.gc_now = 0
                d = stack.start_daemon(0, args.read_chunk_bytes, overrides)
                wait_connected(d, SLOW)
                res["saturated_default_gc"] = saturated(stack, d, args)
        finally:
            stack.stop()
    res["cpu_pressure_after"] = cpu_pressure()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.api")
    ap.add_argument("--seconds", type=float, default=10.0, help="each polling phase")
    ap.add_argument("--wrk-seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=8, help="wrk connections")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--target-rate", type=int, default=100_000, help="ticks/s offered with wrk")
    ap.add_argument(
        "--saturate-rate", type=int, default=0,
        help="lines/s per sender while saturated; 0: bench.firehose as fast as read",
    )  # fmt: skip
    ap.add_argument("--gc-gen0", type=int, default=50_000, help="pipeline.gc_gen0_threshold")
    ap.add_argument("--read-chunk-bytes", type=int, default=65536, help="pipeline.read_chunk_bytes")
    ap.add_argument(
        "--pipeline",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [pipeline] setting for the daemon (repeatable), e.g. flush_min_interval_ms=2",
    )
    ap.add_argument(
        "--no-default-gc",
        dest="compare_default_gc",
        action="store_false",
        help="skip phase 4 (saturated with CPython's default GC thresholds)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy collapsed stacks of the daemon per phase to this folder",
    )
    args = ap.parse_args(argv)
    res = run(args)
    report(res)
    print(json.dumps(res))
    return 0


def report(res: dict[str, Any]) -> None:
    def lat(p: dict[str, Any]) -> str:
        return (f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, max {p['max_ms']} ms "
                f"(loop lag max {p['loop_lag_max_ms']} ms, of it the daemon's own work "
                f"{p['loop_lag_cpu_max_ms']} ms; errors {p['errors'] or 0})")  # fmt: skip

    def gcs(s: dict[str, Any]) -> str:
        g = s["gc"]
        r = g["recent"]
        return (f"GC {g['threshold']}: {s['gc_collections_per_s']} collections/s, pause p99 "
                f"{r['p99_ms']} ms, max {r['max_ms']} ms (on the CPU: p99 {r['cpu_p99_ms']} "
                f"ms, max {r['cpu_max_ms']} ms; last {r['n']}), max by generation "
                f"{g['max_ms_by_generation']} ms; {s['gc_ms_per_s']} ms of GC "
                "per second")  # fmt: skip

    idle, sat, ing = res["idle"], res["saturated"], res["ingesting"]
    print(f"{res['cpus']} CPUs; CPU pressure (PSI some avg60) before "
          f"{res['cpu_pressure_before']}, after {res['cpu_pressure_after']}: "
          "the share of time some task waited for a CPU")  # fmt: skip
    print(f"idle, 50 req/s polling: {lat(idle['poll'])}")
    print(f"idle, wrk {WRK_PATH}: {idle['wrk']['req_per_s']:,} req/s "
          f"(p50 {idle['wrk'].get('p50_ms')} ms, p99 {idle['wrk'].get('p99_ms')} ms; "
          f"daemon CPU {idle['daemon_cpu']:.0%}, {idle['cpu_us_per_request']} us "
          "per request)")  # fmt: skip
    print(f"saturated ingest {sat['ingest_ticks_per_s']:,} ticks/s (daemon CPU "
          f"{sat['daemon_cpu']:.0%}), 50 req/s polling: "
          f"{lat(sat['poll'])}")  # fmt: skip
    print(f"  {gcs(sat)}")
    print(f"ingesting {ing['ingest_ticks_per_s_without_wrk']:,} ticks/s (daemon CPU "
          f"{ing['daemon_cpu_without_wrk']:.0%}; offered "
          f"{ing['offered_ticks_per_s']:,}); with wrk: {ing['wrk']['req_per_s']:,} req/s = "
          f"{ing['req_per_s_vs_idle']:.0%} of idle ({ing['req_per_cpu_s_vs_idle']:.0%} per "
          f"daemon CPU-second; from CPU accounting a dedicated core would serve "
          f"{ing['capacity_vs_idle_from_cpu']:.0%} at {ing['cpu_us_per_request']} us per "
          f"request), ingest achieved meanwhile "
          f"{ing['ingest_ticks_per_s_during_wrk']:,} ticks/s (/health; Redis: "
          f"{ing['ingest_ticks_per_s_during_wrk_redis']:,}; daemon CPU "
          f"{ing['daemon_cpu_during_wrk']:.0%})")  # fmt: skip
    if "saturated_default_gc" in res:
        dg = res["saturated_default_gc"]
        print(f"saturated with CPython's default GC: {dg['ingest_ticks_per_s']:,} ticks/s "
              f"(daemon CPU {dg['daemon_cpu']:.0%}), "
              f"polling {lat(dg['poll'])}")  # fmt: skip
        print(f"  {gcs(dg)}")


if __name__ == "__main__":
    sys.exit(main())
