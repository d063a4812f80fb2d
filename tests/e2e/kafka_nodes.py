"""Aggregate nodes as separate processes (``python -m marketflow --role aggregate``), tick
records produced by the test itself (``encode_batch``, as an ingest node would), and the
oracle: an aggregation of exactly the records the ticks topic holds, read back from it."""

from __future__ import annotations

import asyncio
import math
import random
import signal
import sys
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from marketflow.adapters.kafka.records import RecordError, decode_record, encode_batch
from marketflow.domain.ticks import TickBatch, fold_points
from tests.e2e.oracle import Key, Row
from tests.e2e.procs import Daemon, Proc, poll, to_toml
from tests.harness.services import free_port

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "TONUSDT", "DOGEUSDT", "XRPUSDT", "ADAUSDT", "BNBUSDT"]
EXCHANGES = ["ex1", "ex2"]
REL = 1e-9


@dataclass
class Topics:
    bootstrap: str
    ticks: str
    dead_letter: str
    status: str
    group: str
    partitions: int = 4


class AggregateNode(Daemon):
    """One aggregate node: its own config, log and HTTP port."""

    def __init__(
        self, tmp: Path, name: str, topics: Topics, pg_dsn: str, redis_url: str, **kafka: Any
    ) -> None:
        self.port = free_port()
        self.name = name
        self.config_path = tmp / f"config-{name}.toml"
        config = {
            "pairs": SYMBOLS,
            "http": {"host": "127.0.0.1", "port": 0},
            "postgres": {"dsn": pg_dsn, "connect_timeout_s": 2.0, "unreachable_at_start": "wait"},
            "redis": {"url": redis_url, "connect_timeout_s": 1.0, "unreachable_at_start": "wait"},
            "embedded": {"data_dir": str(tmp / f"var-{name}")},
            "node": {"id": name},
            "capture": {"enabled": False},
            "kafka": {
                "bootstrap_servers": topics.bootstrap,
                "ticks_topic": topics.ticks,
                "ticks_partitions": topics.partitions,
                "dead_letter_topic": topics.dead_letter,
                "status_topic": topics.status,
                "aggregate_group": topics.group,
                "session_timeout_ms": 1500,
                "heartbeat_interval_ms": 300,
                "request_timeout_ms": 5000,
                **kafka,
            },
            "exchanges": [{"name": e, "port": 1} for e in EXCHANGES],
        }
        self.config_path.write_text(to_toml(config))
        argv = [sys.executable, "-m", "marketflow", "--role", "aggregate", "--port",
                str(self.port), "--config", str(self.config_path)]  # fmt: skip
        Proc.__init__(self, argv, tmp / f"node-{name}.log")

    def kafka(self) -> dict[str, Any]:
        status, body = self.get("/health")
        assert status == 200, body
        doc: dict[str, Any] = body["kafka"]
        return doc

    def request_text(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()

    def sigkill(self) -> None:
        self.stop(signal.SIGKILL)


def make_records(
    rng: random.Random, start_ms: int, end_ms: int, step_ms: int = 700
) -> list[TickBatch]:
    """Tick batches of every (exchange, symbol) between ``start_ms`` and ``end_ms`` of exchange
    time, in time order per symbol; half as single points, half folded per second."""
    out: list[TickBatch] = []
    t = start_ms
    while t < end_ms:
        for ex in EXCHANGES:
            for sym in SYMBOLS:
                n = rng.randint(1, 6)
                pts = sorted(
                    (round(rng.uniform(90, 110), rng.randint(0, 6)), t + rng.randrange(step_ms))
                    for _ in range(n)
                )
                pts.sort(key=lambda p: p[1])
                if rng.random() < 0.5:
                    out.append(TickBatch(ex, {sym: pts}, t, n))
                else:
                    folded: dict[tuple[str, int], list[float]] = {}
                    fold_points(folded, sym, pts)
                    out.append(TickBatch(ex, {}, t, n, folded))
        t += step_ms
    return out


async def _create(topics: Topics) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(topics.ticks, topics.partitions, 1),
                NewTopic(topics.dead_letter, 1, 1),
            ]
        )
    finally:
        await admin.close()


def create_topics(topics: Topics) -> None:
    asyncio.run(_create(topics))


async def _produce(bootstrap: str, topic: str, values: Iterable[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, compression_type="lz4"
    )
    await producer.start()
    try:
        for key, value in values:
            await producer.send(topic, key=key, value=value, headers=[("node", b"test")])
        await producer.flush()
    finally:
        await producer.stop()


def produce(bootstrap: str, topic: str, batches: Iterable[TickBatch]) -> None:
    asyncio.run(_produce(bootstrap, topic, [kv for b in batches for kv in encode_batch(b)]))


def produce_raw(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    asyncio.run(_produce(bootstrap, topic, values))


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        got: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            assert loop.time() < deadline, "topic not read back in 60 s"
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                got += records
        return got
    finally:
        await consumer.stop()


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` (aiokafka ConsumerRecords), all partitions."""
    return asyncio.run(_read_all(bootstrap, topic))


@dataclass
class Agg:
    count: int = 0
    low: float = math.inf
    high: float = -math.inf
    parts: list[float] = field(default_factory=list)

    @property
    def avg(self) -> float:
        return math.fsum(self.parts) / self.count


def oracle(records: Iterable[Any]) -> dict[Key, Agg]:
    """Per (exchange, pair, minute): an aggregation of exactly the valid records given."""
    out: dict[Key, Agg] = {}
    for r in records:
        try:
            batch = decode_record(r.value, symbols=frozenset(SYMBOLS))
        except RecordError:
            continue
        for (sym, second), f in batch.seconds().items():
            a = out.setdefault((batch.exchange, sym, second // 60 * 60_000), Agg())
            a.count += int(f[3])
            a.low = min(a.low, f[0])
            a.high = max(a.high, f[1])
            a.parts.append(f[2])
    return out


def mismatches(rows: dict[Key, Row], want: dict[Key, Agg]) -> list[str]:
    errs = []
    for key in sorted(set(rows) | set(want)):
        r, w = rows.get(key), want.get(key)
        if r is None or w is None:
            errs.append(f"{key}: row {r} vs oracle {w and (w.count, w.low, w.high)}")
            continue
        if (r.count, r.low, r.high) != (w.count, w.low, w.high) or not math.isclose(
            r.avg, w.avg, rel_tol=REL
        ):
            errs.append(
                f"{key}: row count={r.count} low={r.low} high={r.high} avg={r.avg}, "
                f"oracle count={w.count} low={w.low} high={w.high} avg={w.avg}"
            )
    return errs


def wait_caught_up(nodes: list[AggregateNode], partitions: int, timeout: float = 60) -> None:
    """Until the live nodes own every partition between them, once each, with no lag."""

    def fetch() -> list[dict[str, Any]]:
        return [n.kafka() for n in nodes]

    def done(docs: list[dict[str, Any]]) -> bool:
        owned = [p for d in docs for p in d["partitions"]]
        return sorted(owned) == list(range(partitions)) and all(
            len(d["lag"]) == len(d["partitions"]) and not any(d["lag"].values()) for d in docs
        )

    poll(fetch, done, timeout, "nodes caught up")
