"""The harness's Kafka is a real broker: records and committed offsets survive a crash and a
restart on the same port, so the fault tests of the Kafka roles can lean on it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from tests.harness.services import KafkaServer

pytestmark = pytest.mark.timeout(120)


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, compression_type="lz4"
    )
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send(topic, key=str(i % 3).encode(), value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, group: str, want: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(got) < want and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            got += [r.value for records in batches.values() for r in records if r.value]
        await consumer.commit()
    finally:
        await consumer.stop()
    return got


async def _committed(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(meta.offset for meta in offsets.values())
    finally:
        await admin.close()


async def _committed_once_loaded(bootstrap: str, group: str, want: int) -> int:
    """The group's committed total, asked until it reads ``want`` or 30 s pass: right after a
    restart the coordinator may still be loading the offsets topic and answer with none (or an
    error) for a while; offsets really lost never come back, and the last answer is returned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    got = -1
    while loop.time() < deadline:
        try:
            got = await _committed(bootstrap, group)
        except KafkaError:
            got = -1
        if got == want:
            break
        await asyncio.sleep(0.5)
    return got


async def test_records_and_offsets_survive_a_crash_and_a_restart(
    private_kafka: KafkaServer,
) -> None:
    topic, group = f"t-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    first = [f"a{i}".encode() for i in range(50)]
    await _produce(private_kafka.bootstrap, topic, first)
    assert sorted(await _consume(private_kafka.bootstrap, topic, group, 50)) == sorted(first)

    private_kafka.kill()
    private_kafka.start()
    assert await _committed_once_loaded(private_kafka.bootstrap, group, 50) == 50

    second = [f"b{i}".encode() for i in range(20)]
    await _produce(private_kafka.bootstrap, topic, second)
    private_kafka.restart()
    # The group resumes from its committed offsets: only the records after them come back.
    assert sorted(await _consume(private_kafka.bootstrap, topic, group, 20)) == sorted(second)
