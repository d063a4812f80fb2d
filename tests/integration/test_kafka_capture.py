"""FIX capture over a real broker: the listener's frames copied to the capture topic, and a
topic of raw FIX read back into an audit trail (FixFeeder's Kafka consumer source)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from marketflow.adapters.kafka.capture import KafkaCaptureSource, KafkaCaptureTee
from marketflow.settings import KafkaSettings
from tests.harness.services import KafkaServer

pytestmark = pytest.mark.timeout(90)

FRAMES = [b"8=FIX.4.4\x019=5\x0135=0\x0110=000\x01", b"8=FIX.4.4\x019=5\x0135=1\x0110=001\x01"]


class Trail:
    """What an audit trail was given: (peer, received_ms, frames) per submit."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, list[bytes]]] = []
        self.flushes = 0

    async def submit(
        self,
        peer: str,
        received_ms: int,
        frames: Sequence[bytes],
        rejects: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        self.got.append((peer, received_ms, list(frames)))

    async def flush(self) -> None:
        self.flushes += 1


async def test_captured_frames_reach_the_topic_and_a_source_reads_them_into_a_trail(
    kafka_server: KafkaServer,
) -> None:
    topic = f"capture-{uuid.uuid4().hex[:8]}"
    k = KafkaSettings(bootstrap_servers=kafka_server.bootstrap, capture_topic=topic)
    listener_trail, source_trail = Trail(), Trail()
    tee = KafkaCaptureTee(listener_trail, k, "n1")
    await tee.start()
    try:
        await tee.submit("10.0.0.7:5000", 1_796_000_000_123, FRAMES)
        assert listener_trail.got == [("10.0.0.7:5000", 1_796_000_000_123, FRAMES)]
        for _ in range(200):
            if tee.published == len(FRAMES):
                break
            await asyncio.sleep(0.05)
        assert tee.stats() == {"kafka_published": 2, "kafka_failed": 0}
    finally:
        await tee.aclose()
    source = KafkaCaptureSource(source_trail, k, topic, "n2")
    await source.start()
    try:
        for _ in range(400):
            if sum(len(f) for _, _, f in source_trail.got) >= len(FRAMES):
                break
            await asyncio.sleep(0.05)
    finally:
        await source.aclose()
    frames = [f for _, _, fs in source_trail.got for f in fs]
    assert frames == FRAMES
    assert {(p, ms) for p, ms, _ in source_trail.got} == {
        ("kafka:10.0.0.7:5000", 1_796_000_000_123)
    }
    assert source_trail.flushes >= 1
    assert source.stats() == {"kafka_consumed": 2}
