"""Kafka benchmark: firehoses -> ingest node -> Kafka -> aggregate node -> Redis and PostgreSQL,
beside the single process measured in the same run.

    python -m bench.kafka [--sources 2] [--pairs 5] [--seconds 15] [--warmup 4] [--ingest-only]

Prints, from one run on real PostgreSQL, Redis and Apache Kafka (the test harness's servers):

- ``single``: the daemon in one process (role ``all``), its /health ``ticks`` per second
  while saturating firehoses (bench.ingest's senders) feed it;
- ``kafka``: one ingest node and one aggregate node (``--role ingest`` / ``--role
  aggregate``), each pinned to its own CPU on a 2-core machine (the senders, the broker and
  the servers share them): ``ticks_per_s`` folded by the aggregate node (its /health
  ``ticks``), the ingest node's published ticks/s, end-to-end p99 latency (exchange timestamp
  -> readable in Redis, bench.ingest's poller) and the aggregate group's consumer lag (records,
  summed over partitions, sampled at the end of the interval) — and their ratio to ``single``
  (target >= 0.6). Latency is measured first, with the senders paced at ``--latency-rate``
  ticks/s in all (saturated, it would be the senders' own socket backlog), then the senders
  are replaced by saturating ones on the same ports for the throughput.

Without an aggregate role in this tree (``--role aggregate`` refused), or with
``--ingest-only``, the Kafka leg is ingest -> Kafka only: ticks/s published, counted back from
the topic (the records' tick counts over the interval), and that is printed as ``mode``.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from bench.firehose import pair_names
from bench.ingest import Firehose, percentile, pin, sample_latency
from marketflow.adapters.kafka.producer import partitions_of
from marketflow.adapters.kafka.records import decode_record
from tests.e2e.procs import ROOT, Daemon, Proc, to_toml
from tests.harness.services import KafkaServer, PostgresServer, RedisServer, free_port


class Node(Daemon):
    """A marketflow process of one role with its own config and log."""

    def __init__(self, tmp: Path, name: str, role: str, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(to_toml(config))
        argv = [sys.executable, "-m", "marketflow", "--role", role, "--port", str(self.port),
                "--config", str(self.config_path)]  # fmt: skip
        Proc.__init__(self, argv, tmp / f"{name}.log")


def aggregate_role_exists() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import marketflow.adapters.kafka.tick_consumer"],
        cwd=ROOT, capture_output=True, check=False,
    )  # fmt: skip
    return probe.returncode == 0


def health(node: Daemon) -> dict[str, Any]:
    doc: dict[str, Any] = node.get("/health")[1]
    return doc


async def consumer_lag(bootstrap: str, topic: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await reader.start()
    try:
        ends = await reader.end_offsets(await partitions_of(reader, topic))
        committed = await admin.list_consumer_group_offsets(group)
        return sum(end - (committed[tp].offset if tp in committed else 0) for tp, end in
                   ends.items())  # fmt: skip
    finally:
        await reader.stop()
        await admin.close()


async def topic_ticks(bootstrap: str, topic: str, t0_ms: int, t1_ms: int) -> int:
    """Ticks of the records received by the ingest node within [t0_ms, t1_ms)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    total = 0
    try:
        tps = await partitions_of(reader, topic)
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo:
            got = await reader.getmany(*todo, timeout_ms=1000, max_records=20_000)
            for tp, records in got.items():
                for r in records:
                    batch = decode_record(r.value)
                    if t0_ms <= batch.received_ms < t1_ms:
                        total += batch.count
                if await reader.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        await reader.stop()
    return total


def measure(node: Daemon, key: Any, seconds: float) -> float:
    t0, n0 = time.monotonic(), key(health(node))
    time.sleep(seconds)
    t1, n1 = time.monotonic(), key(health(node))
    return float(n1 - n0) / (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kafka")
    ap.add_argument("--sources", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--ingest-only", action="store_true", help="no aggregate node")
    ap.add_argument("--latency-rate", type=float, default=20_000, help="ticks/s in all")
    ap.add_argument("--latency-seconds", type=float, default=8.0)
    args = ap.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    first = {cpus[0]} if cpus else set()
    second = {cpus[1]} if len(cpus) > 1 else first
    with_aggregate = not args.ingest_only and aggregate_role_exists()
    pairs = pair_names(args.pairs)
    result: dict[str, Any] = {"mode": "ingest+aggregate" if with_aggregate else "ingest-only"}
    with (
        tempfile.TemporaryDirectory() as tmp_dir,
        PostgresServer() as pg,
        RedisServer() as rd,
        KafkaServer() as kafka,
    ):
        tmp = Path(tmp_dir)
        stores = {
            "postgres": {"dsn": pg.dsn, "unreachable_at_start": "wait"},
            "redis": {"url": rd.url, "unreachable_at_start": "wait"},
        }
        base: dict[str, Any] = {
            "http": {"host": "127.0.0.1", "port": 0},
            "capture": {"enabled": False, "port": free_port()},
            "log_level": "WARNING",
            "pairs": pairs,
        }
        # -- the single process ------------------------------------------------------------
        hoses = [Firehose(args.pairs, 0, 0) for _ in range(args.sources)]
        exchanges = [{"name": f"ex{i + 1}", "port": h.port} for i, h in enumerate(hoses)]
        single = Node(tmp, "single", "all", {
            **base, **stores, "embedded": {"data_dir": str(tmp / "var-single")},
            "exchanges": exchanges,
        })  # fmt: skip
        single.start()
        assert single.proc is not None
        pin(single.proc.pid, first)
        try:
            time.sleep(args.warmup)
            result["single_ticks_per_s"] = round(
                measure(single, lambda h: h["ticks"], args.seconds)
            )
        finally:
            single.stop()
            for h in hoses:
                h.stop()
        # -- ingest -> Kafka (-> aggregate) --------------------------------------------------
        ticks_topic = "bench.ticks"
        k: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap, "ticks_topic": ticks_topic,
            "ticks_partitions": 4, "feeds_topic": "bench.feeds", "status_topic": "bench.status",
            "dead_letter_topic": "bench.dead", "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000, "linger_ms": 5,
        }  # fmt: skip
        paced = args.latency_rate / args.sources if with_aggregate else 0
        hoses = [Firehose(args.pairs, paced, 0) for _ in range(args.sources)]
        exchanges = [{"name": f"ex{i + 1}", "port": h.port} for i, h in enumerate(hoses)]
        nodes: list[Daemon] = []
        try:
            aggregate = None
            if with_aggregate:
                aggregate = Node(tmp, "aggregate", "aggregate", {
                    **base, **stores, "embedded": {"data_dir": str(tmp / "var-agg")},
                    "node": {"id": "agg1"}, "kafka": k, "exchanges": exchanges,
                })  # fmt: skip
                aggregate.start()
                nodes.append(aggregate)
                assert aggregate.proc is not None
                pin(aggregate.proc.pid, second)
            ingest = Node(tmp, "ingest", "ingest", {
                **base, "embedded": {"data_dir": str(tmp / "var-ingest")},
                "node": {"id": "ing1"}, "kafka": k, "exchanges": exchanges,
            })  # fmt: skip
            ingest.start()
            nodes.append(ingest)
            assert ingest.proc is not None
            pin(ingest.proc.pid, first)
            time.sleep(args.warmup)
            fields = [f"ex{i + 1}:{pairs[0]}" for i in range(args.sources)]
            if aggregate is not None:
                # Latency at a paced rate (saturated, it is the senders' socket backlog).
                latencies = asyncio.run(sample_latency(rd.url, fields, args.latency_seconds))
                result["latency_rate"] = args.latency_rate
                result["e2e_p99_ms"] = round(percentile(latencies, 0.99), 1)
                result["e2e_p50_ms"] = round(percentile(latencies, 0.50), 1)
                for h in hoses:  # the same ports: the ingest node reconnects to saturating ones
                    h.stop()
                hoses = [Firehose(args.pairs, 0, 0, h.port) for h in hoses]
                time.sleep(args.warmup)
            t0_ms = time.time_ns() // 1_000_000
            if aggregate is not None:
                a0, p0, m0 = health(aggregate)["ticks"], health(ingest), time.monotonic()
                time.sleep(args.seconds)
                a1, p1, m1 = health(aggregate)["ticks"], health(ingest), time.monotonic()
                lag = asyncio.run(consumer_lag(kafka.bootstrap, ticks_topic,
                                               "marketflow-aggregate"))  # fmt: skip
                result["ticks_per_s"] = round((a1 - a0) / (m1 - m0))
                result["consumer_lag_records"] = lag
            else:
                p0, m0 = health(ingest), time.monotonic()
                time.sleep(args.seconds)
                p1, m1 = health(ingest), time.monotonic()
            t1_ms = time.time_ns() // 1_000_000
            published = p1["kafka"]["published_ticks"] - p0["kafka"]["published_ticks"]
            result["published_ticks_per_s"] = round(published / (m1 - m0))
            counted = asyncio.run(topic_ticks(kafka.bootstrap, ticks_topic, t0_ms, t1_ms))
            result["topic_ticks_per_s"] = round(counted / ((t1_ms - t0_ms) / 1000))
            result["producer_replaced"] = p1["kafka"]["producer_replaced"]
        finally:
            for n in nodes[::-1]:
                n.stop()
            for h in hoses:
                h.stop()
    measured = result.get("ticks_per_s", result["topic_ticks_per_s"])
    result["ratio_to_single"] = round(measured / max(1, result["single_ticks_per_s"]), 3)
    print(f"single process:  {result['single_ticks_per_s']:>10,} ticks/s")
    print(f"kafka ({result['mode']}): {measured:>10,} ticks/s  ratio {result['ratio_to_single']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
