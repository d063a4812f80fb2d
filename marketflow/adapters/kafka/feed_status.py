"""Feed status from the status topic: what the aggregate role knows of feeds it does not read.

Ingest nodes publish, keyed by exchange, ``{"v":1,"exchange":..,"state":"connected"|"stale"|
"disconnected","node":..,"at_ms":..,"since_ms":..}`` on every change and every second while
connected. This reader (no consumer group: every node reads every partition, from the end)
keeps the newest per exchange; an exchange not heard from within ``kafka.session_timeout_ms``
is disconnected (its ingest node died). The aggregator's coverage (``covered_ms``) and the
world view's venue status read it as they read a local feed's status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from marketflow.adapters.kafka.client import client_options, ensure_topic
from marketflow.domain.feeds import FeedStatus
from marketflow.settings import KafkaSettings

log = logging.getLogger("marketflow.kafka")

STATES = ("connected", "stale", "disconnected")


class FeedStatusReader:
    """The newest status of each exchange, from ``kafka.status_topic``."""

    def __init__(
        self, settings: KafkaSettings, exchanges: list[str], clock: Callable[[], int]
    ) -> None:
        self._s = settings
        self._clock = clock
        self._timeout_ms = settings.session_timeout_ms
        # exchange -> (state, heard_ms): heard by this node's clock, not the sender's
        self._heard: dict[str, tuple[str, int]] = {}
        self._status = {ex: FeedStatus(ex, "kafka") for ex in exchanges}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.bad = 0

    async def start(self) -> None:
        await ensure_topic(self._s, self._s.status_topic, 1)
        self._consumer = AIOKafkaConsumer(
            self._s.status_topic,
            **client_options(self._s),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="kafka-feed-status")

    async def aclose(self) -> None:
        """Stop reading; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                got = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("kafka_status_fetch_failed error=%r", exc)
                await asyncio.sleep(1.0)
                continue
            now = self._clock()
            for records in got.values():
                for r in records:
                    self._take(r.value, now)

    def _take(self, value: bytes | None, now: int) -> None:
        try:
            doc = orjson.loads(value or b"")
            exchange, state = doc["exchange"], doc["state"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.bad += 1
            return
        if not isinstance(exchange, str) or state not in STATES:
            self.bad += 1
            return
        self._heard[exchange] = (state, now)

    def statuses(self) -> list[FeedStatus]:
        """One status per exchange (configured or heard of), as of now."""
        now = self._clock()
        for ex, (state, heard) in self._heard.items():
            st = self._status.get(ex)
            if st is None:
                st = self._status[ex] = FeedStatus(ex, "kafka")
            alive = now - heard <= self._timeout_ms
            st.connected = alive and state != "disconnected"
            st.stale = alive and state == "stale"
        return list(self._status.values())

    def healthy(self) -> list[str]:
        """Exchanges whose ingest node says connected, heard within the session timeout."""
        return [st.name for st in self.statuses() if st.connected and not st.stale]
