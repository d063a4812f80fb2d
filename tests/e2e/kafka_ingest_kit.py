"""Ingest nodes as processes (``python -m marketflow --role ingest``) and the ticks topic read
back, for the Kafka ingest end-to-end tests."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from marketflow.adapters.kafka.producer import partitions_of
from marketflow.adapters.kafka.records import decode_record
from tests.e2e.procs import Daemon, Proc, to_toml
from tests.harness.services import free_port

PAIRS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]


class IngestProc(Daemon):
    """One ingest node with its own config, log and data directory."""

    def __init__(self, tmp: Path, name: str, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.name = name
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(to_toml(config))
        Proc.__init__(
            self,
            [
                sys.executable, "-m", "marketflow", "--role", "ingest", "--port", str(self.port),
                "--config", str(self.config_path),
            ],
            tmp / f"{name}.log",
        )  # fmt: skip

    def owned(self) -> list[str]:
        _, health = self.get("/health")
        return list(health["feeds"]["owned"])


def kafka_config(bootstrap: str, tag: str, **overrides: Any) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap,
        "ticks_topic": f"ticks-{tag}",
        "ticks_partitions": 4,
        "status_topic": f"status-{tag}",
        "feeds_topic": f"feeds-{tag}",
        "feeds_group": f"feeds-{tag}",
        "session_timeout_ms": 2000,
        "heartbeat_interval_ms": 500,
        "request_timeout_ms": 2000,
        "linger_ms": 5,
        "mark_interval_ms": 300,
        **overrides,
    }


def node_config(
    tmp: Path, node: str, kafka: dict[str, Any], exchanges: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "pairs": PAIRS,
        "http": {"host": "127.0.0.1", "port": 0},
        "embedded": {"data_dir": str(tmp / f"var-{node}")},
        "pipeline": {"stale_after_s": 3.0, "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0},
        "node": {"id": node, "role": "ingest"},
        "kafka": kafka,
        "exchanges": exchanges,
    }


def new_tag() -> str:
    return uuid.uuid4().hex[:8]


@dataclass
class TopicRecord:
    partition: int
    offset: int
    exchange: str
    node: str
    mark: int | None
    ticks: list[tuple[str, float, int]]  # symbol, price, timestamp (points only)
    count: int
    received_ms: int


async def _read_topic(bootstrap: str, topic: str) -> list[TopicRecord]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    out: list[TopicRecord] = []
    try:
        tps = await partitions_of(reader, topic)
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo:
            got = await reader.getmany(*todo, timeout_ms=1000)
            for tp, records in got.items():
                for r in records:
                    headers = {k: v.decode() for k, v in r.headers}
                    batch = decode_record(r.value)
                    points = [(sym, p, ts) for sym, pts in batch.by_symbol.items() for p, ts in pts]
                    mark = headers.get("mark")
                    out.append(
                        TopicRecord(
                            tp.partition, r.offset, batch.exchange, headers.get("node", ""),
                            int(mark) if mark else None, points, batch.count, batch.received_ms,
                        )
                    )  # fmt: skip
                if await reader.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        await reader.stop()
    return out


def read_topic(bootstrap: str, topic: str) -> list[TopicRecord]:
    return asyncio.run(_read_topic(bootstrap, topic))


def tick_counter(records: list[TopicRecord], exchange: str) -> Counter[tuple[str, float, int]]:
    return Counter(t for r in records if r.exchange == exchange for t in r.ticks)


def owner_runs(records: list[TopicRecord], exchange: str) -> list[str]:
    """The nodes that published ``exchange``'s records, in receipt order, runs collapsed:
    ``["na", "nb"]`` when na read it and then nb did; two readers at once interleave."""
    runs: list[str] = []
    for r in sorted((r for r in records if r.exchange == exchange), key=lambda r: r.received_ms):
        if not runs or runs[-1] != r.node:
            runs.append(r.node)
    return runs


async def _read_values(bootstrap: str, topic: str) -> list[bytes]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    out: list[bytes] = []
    try:
        tps = await partitions_of(reader, topic)
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo:
            got = await reader.getmany(*todo, timeout_ms=1000)
            for tp, records in got.items():
                out += [r.value for r in records if r.value is not None]
                if await reader.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        await reader.stop()
    return out


def read_values(bootstrap: str, topic: str) -> list[bytes]:
    return asyncio.run(_read_values(bootstrap, topic))
