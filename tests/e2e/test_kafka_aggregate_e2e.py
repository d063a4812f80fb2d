"""Issue 14, the aggregate role on a real broker: nodes are separate processes sharing one
consumer group, PostgreSQL and Redis; the test produces the tick records itself.

Exchange time lies 30 minutes in the past, so every minute is closed by the wall clock (the
aggregator closes a minute ``minute_grace_ms`` after its end by the later of the wall clock
and the newest exchange timestamp): a record arriving later reopens its minute and the row is
rewritten. "Mid-minute" is therefore the log's middle of a minute: half of its records
consumed when the node dies. At the end every row must equal the aggregation of exactly the
records in the topic (read back from it): count, min and max exact, the average within float
tolerance; one row per (exchange, pair, minute) is the table's key, and a missing or extra
row is a failure too.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import redis
from aiokafka.admin import AIOKafkaAdminClient

from tests.e2e.kafka_nodes import (
    EXCHANGES,
    SYMBOLS,
    AggregateNode,
    Topics,
    create_topics,
    make_records,
    mismatches,
    oracle,
    produce,
    produce_raw,
    read_topic,
    wait_caught_up,
)
from tests.e2e.oracle import read_rows
from tests.e2e.procs import poll
from tests.harness.services import KafkaServer

pytestmark = pytest.mark.e2e


def _topics(bootstrap: str) -> Topics:
    tag = uuid.uuid4().hex[:8]
    return Topics(bootstrap, f"ticks-{tag}", f"dlq-{tag}", f"status-{tag}", f"agg-{tag}")


def _base_ms() -> int:
    return (int(time.time()) - 1800) // 60 * 60_000


def _rows_equal_topic(pg_dsn: str, topics: Topics, timeout: float = 60) -> None:
    want = oracle(read_topic(topics.bootstrap, topics.ticks))
    poll(lambda: mismatches(read_rows(pg_dsn), want), lambda e: not e, timeout, "rows = topic")


async def _committed(bootstrap: str, group: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {tp.partition: meta.offset for tp, meta in offsets.items()}
    finally:
        await admin.close()


def _redis_marks(redis_url: str, topic: str) -> dict[int, int]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        raw: dict[str, str] = client.hgetall("marketflow:marks")  # type: ignore[assignment]
    finally:
        client.close()
    prefix = f"kafka:{topic}:"
    return {
        int(k[len(prefix) :]): int(v.split(",")[0]) for k, v in raw.items() if k.startswith(prefix)
    }


@pytest.mark.timeout(240)
def test_two_nodes_kills_and_a_broker_restart_leave_rows_equal_to_the_topic(
    tmp_path: Path, private_kafka: KafkaServer, pg_dsn: str, redis_url: str
) -> None:
    rng = random.Random(14)
    topics = _topics(private_kafka.bootstrap)
    create_topics(topics)
    base = _base_ms()
    minute = 60_000
    nodes = {name: AggregateNode(tmp_path, name, topics, pg_dsn, redis_url) for name in ("a", "b")}
    for n in nodes.values():
        n.start()
    try:
        # Two nodes in one group split the partitions (each /health shows its share).
        wait_caught_up(list(nodes.values()), topics.partitions)
        shares = [n.kafka()["partitions"] for n in nodes.values()]
        assert all(shares), shares
        assert not set(shares[0]) & set(shares[1]), shares

        produce(topics.bootstrap, topics.ticks, make_records(rng, base, base + 90_000))
        wait_caught_up(list(nodes.values()), topics.partitions)
        # SIGKILL mid-minute (half of minute 1 consumed): the survivor takes every partition.
        nodes.pop("a").sigkill()
        produce(topics.bootstrap, topics.ticks, make_records(rng, base + 90_000, base + 2 * minute))
        wait_caught_up(list(nodes.values()), topics.partitions)
        assert nodes["b"].kafka()["partitions"] == list(range(topics.partitions))

        # A node that dies right after a flush wrote Redis, before Kafka's offsets follow.
        c = AggregateNode(
            tmp_path, "c", topics, pg_dsn, redis_url, test_fault="exit_after_flush_before_commit"
        )
        c.start()
        poll(lambda: c.kafka()["partitions"], bool, 30, "c took partitions")
        produce(
            topics.bootstrap, topics.ticks, make_records(rng, base + 2 * minute, base + 150_000)
        )
        assert c.proc is not None
        assert poll(c.proc.poll, lambda rc: rc is not None, 30, "c's fault exit") == 86
        assert "kafka_test_fault" in c.log()
        committed = asyncio.run(_committed(topics.bootstrap, topics.group))
        marks = _redis_marks(redis_url, topics.ticks)
        ahead = [p for p, m in marks.items() if m > committed.get(p, -1)]
        assert ahead, f"no stored mark ahead of Kafka's: marks={marks} committed={committed}"
        wait_caught_up(list(nodes.values()), topics.partitions)

        # A second node joins again, then the broker restarts mid-run.
        nodes["a2"] = AggregateNode(tmp_path, "a2", topics, pg_dsn, redis_url)
        nodes["a2"].start()
        wait_caught_up(list(nodes.values()), topics.partitions)
        produce(
            topics.bootstrap, topics.ticks, make_records(rng, base + 150_000, base + 3 * minute)
        )
        private_kafka.restart()
        produce(
            topics.bootstrap,
            topics.ticks,
            make_records(rng, base + 3 * minute, base + 4 * minute + 30_000),
        )
        wait_caught_up(list(nodes.values()), topics.partitions, timeout=90)
        shares = [n.kafka()["partitions"] for n in nodes.values()]
        assert all(shares), shares

        _rows_equal_topic(pg_dsn, topics)
        _every_node_answers_for_every_pair(list(nodes.values()), topics)
    finally:
        for n in nodes.values():
            n.stop()


def _every_node_answers_for_every_pair(nodes: list[AggregateNode], topics: Topics) -> None:
    """Each node answers for the pairs the other one holds too (Redis and PostgreSQL), and
    the all-history answers equal the topic's records."""
    want = oracle(read_topic(topics.bootstrap, topics.ticks))
    for ex in EXCHANGES:
        for sym in SYMBOLS:
            minutes = [a for (e, p, _), a in want.items() if (e, p) == (ex, sym)]
            count = sum(a.count for a in minutes)
            total = math.fsum(x for a in minutes for x in a.parts)
            latest = []
            for n in nodes:
                status, avg = n.get(f"/prices/average/{ex}/{sym}")
                assert status == 200, (n.name, ex, sym, avg)
                assert avg["count"] == count, (n.name, ex, sym, avg, count)
                assert math.isclose(avg["price"], total / count, rel_tol=1e-9), (n.name, avg)
                status, high = n.get(f"/prices/highest/{ex}/{sym}")
                assert high["price"] == max(a.high for a in minutes), (n.name, ex, sym, high)
                latest.append(n.get(f"/prices/latest/{ex}/{sym}"))
            assert all(got == latest[0] and got[0] == 200 for got in latest), latest


def _bool_price_record() -> bytes:
    # The record layout (records.TickRecord) with True where a price belongs.
    ts = _base_ms() + 1000
    return msgspec.msgpack.encode([1, "ex1", "BTCUSDT", ts, 1, [[True, ts]], [], []])


@pytest.mark.timeout(120)
def test_poison_records_are_counted_dead_lettered_and_skipped(
    tmp_path: Path, kafka_server: KafkaServer, pg_dsn: str, redis_url: str
) -> None:
    rng = random.Random(15)
    topics = _topics(kafka_server.bootstrap)
    create_topics(topics)
    base = _base_ms()
    node = AggregateNode(tmp_path, "p", topics, pg_dsn, redis_url)
    # Records before the node starts: it catches up from the beginning of the log.
    produce(topics.bootstrap, topics.ticks, make_records(rng, base, base + 20_000))
    poison = [(b"BTCUSDT", b"\x93not msgpack at all"), (b"BTCUSDT", _bool_price_record())]
    produce_raw(topics.bootstrap, topics.ticks, poison)
    node.start()
    try:
        produce(topics.bootstrap, topics.ticks, make_records(rng, base + 20_000, base + 80_000))
        wait_caught_up([node], topics.partitions)
        doc = poll(node.kafka, lambda d: d["dead_lettered"] == 2, 30, "two dead letters")
        assert sum(doc["bad_records"].values()) == 2, doc
        assert doc["dead_letter_failed"] == 0, doc

        letters = read_topic(topics.bootstrap, topics.dead_letter)
        assert sorted(r.value for r in letters) == sorted(v for _, v in poison)
        source = {(r.partition, r.offset): r for r in read_topic(topics.bootstrap, topics.ticks)}
        for r in letters:
            h = {k: v.decode() for k, v in r.headers}
            assert h["source_topic"] == topics.ticks, h
            assert h["node"] == "p", h
            assert h["reason"] in doc["bad_records"], h
            origin = source[(int(h["source_partition"]), int(h["source_offset"]))]
            assert origin.value == r.value
            assert r.key == b"BTCUSDT"
        status, text = node.request_text("/metrics")
        assert status == 200
        assert "marketflow_kafka_bad_records_total{reason=" in text
        # Every tick after the poison is aggregated: the rows equal the valid records.
        _rows_equal_topic(pg_dsn, topics)

        # Feed status from the ingest side: connected while heartbeats come, then (none
        # within kafka.session_timeout_ms) disconnected; a venue never heard of is down.
        beat = {"v": 1, "exchange": "ex1", "state": "connected", "node": "i1"}
        heartbeat = [(b"ex1", json.dumps({**beat, "at_ms": int(time.time() * 1000)}).encode())]
        produce_raw(topics.bootstrap, topics.status, heartbeat)
        feeds = poll(lambda: node.kafka()["feeds"], lambda f: f["ex1"] == "connected", 30, "up")
        assert feeds["ex2"] == "disconnected", feeds
        poll(lambda: node.kafka()["feeds"], lambda f: f["ex1"] == "disconnected", 30, "timed out")

        # A letter that is valid now (here: one put there by hand) goes back to the ticks topic
        # with the CLI; the two poison records stay.
        fixed = make_records(rng, base + 80_000, base + 81_000)[:1]
        produce(topics.bootstrap, topics.dead_letter, fixed)
        replay = subprocess.run(
            [sys.executable, "-m", "marketflow", "dead-letters", "replay", "--config",
             str(node.config_path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert replay.returncode == 0, replay.stderr
        summary = json.loads(replay.stdout.strip().splitlines()[-1])
        assert summary["read"] == 3, summary
        assert summary["replayed"] == 1, summary
        assert sum(summary["still_invalid"].values()) == 2, summary
        _rows_equal_topic(pg_dsn, topics)
    finally:
        node.stop()
