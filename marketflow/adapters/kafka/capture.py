"""FIX capture over Kafka: captured frames copied to kafka.capture_topic, and raw FIX consumed
from a topic into the audit trail (FixFeeder's Kafka consumer source).

``KafkaCaptureTee`` is the listener's sink when Kafka is configured: every framed message goes
to the audit trail as before and, unchanged, to the capture topic (key: the peer, headers
``received_ms`` and ``node``). The copy does not hold the audit trail back: records are
handed to the producer without waiting; a record the broker refuses is counted
(``kafka_failed`` in /health), never silent.

``KafkaCaptureSource`` reads raw FIX frames (one message per record value, as the tee writes
them or as FixFeeder publishes them) from ``capture.kafka_source_topic`` in its own consumer
group and submits them like a listener connection would (peer ``kafka:<key>``). Offsets are
committed after the batch went into the audit trail's pipeline and was flushed to it:
at-least-once (a crash between the flush and the commit stores those messages again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from marketflow.adapters.capture.listener import FrameSink
from marketflow.adapters.kafka.producer import connection_options
from marketflow.settings import KafkaSettings

log = logging.getLogger("marketflow.kafka.capture")


class CaptureSink(FrameSink, Protocol):
    """The audit trail (app.capture.CaptureService): the listener's sink, flushable."""

    async def flush(self) -> None: ...


class KafkaCaptureTee:
    """A ``FrameSink``: the audit trail, and a copy of every frame to the capture topic."""

    def __init__(self, inner: CaptureSink, k: KafkaSettings, node: str) -> None:
        self._inner = inner
        self._k = k
        self._node = node.encode()
        self._producer = AIOKafkaProducer(
            **connection_options(k, f"{k.client_id}-{node}-capture"),
            acks="all",
            enable_idempotence=True,
            compression_type=None if k.compression == "none" else k.compression,
            linger_ms=k.linger_ms,
        )
        self.published = 0
        self.failed = 0
        self._started = False

    async def start(self) -> None:
        try:
            await self._producer.start()
            self._started = True
        except Exception as exc:  # noqa: BLE001 - the audit trail goes on without the copy
            log.error("capture_kafka_unavailable error=%r", exc)  # noqa: TRY400

    async def submit(
        self,
        peer: str,
        received_ms: int,
        frames: Sequence[bytes],
        rejects: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        await self._inner.submit(peer, received_ms, frames, rejects)
        if not self._started:
            self.failed += len(frames)
            return
        headers = [("received_ms", str(received_ms).encode()), ("node", self._node)]
        key = peer.encode()
        for frame in frames:
            try:
                sent = await self._producer.send(
                    self._k.capture_topic, frame, key=key, headers=headers
                )
            except Exception as exc:  # noqa: BLE001 - counted, logged: the trail has it
                self.failed += 1
                log.warning("capture_kafka_send_failed error=%r", exc)
                continue
            sent.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
        else:
            self.published += 1

    def stats(self) -> dict[str, int]:
        return {"kafka_published": self.published, "kafka_failed": self.failed}

    async def aclose(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()


def _source_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("capture_kafka_source_died error=%r", task.exception())


class KafkaCaptureSource:
    """Raw FIX from a topic into the audit trail."""

    def __init__(self, sink: CaptureSink, k: KafkaSettings, topic: str, node: str) -> None:
        self._sink = sink
        self._topic = topic
        self._consumer = AIOKafkaConsumer(
            topic,
            **connection_options(k, f"{k.client_id}-{node}-capture-source"),
            group_id=f"{k.client_id}-capture-source",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.consumed = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="capture-kafka-source")
        self._task.add_done_callback(_source_ended)

    async def _run(self) -> None:
        while True:
            got = await self._consumer.getmany(timeout_ms=1_000, max_records=5_000)
            if not got:
                continue
            for records in got.values():
                by_peer: dict[str, tuple[int, list[bytes]]] = {}
                for r in records:
                    if not r.value:
                        continue
                    peer = f"kafka:{(r.key or b'').decode(errors='replace')}"
                    headers = dict(r.headers)
                    stamp = headers.get("received_ms")
                    received = int(stamp) if stamp else r.timestamp or time.time_ns() // 10**6
                    by_peer.setdefault(peer, (received, []))[1].append(r.value)
                for peer, (received, frames) in by_peer.items():
                    await self._sink.submit(peer, received, frames)
                    self.consumed += len(frames)
            await self._sink.flush()
            await self._consumer.commit()

    def stats(self) -> dict[str, int]:
        return {"kafka_consumed": self.consumed}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._consumer.stop()
