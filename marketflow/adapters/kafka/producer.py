"""The ingest role's aiokafka side: connection and security options from ``KafkaSettings``,
topics created when missing, and the producer the ingest role sends through."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from marketflow.adapters.kafka.publisher import Ack, OutRecord
from marketflow.domain.errors import ConfigError
from marketflow.settings import KafkaSettings

log = logging.getLogger("marketflow.kafka")


def connection_options(k: KafkaSettings, client_id: str) -> dict[str, Any]:
    """bootstrap, client id, security protocol, SASL and TLS for any aiokafka client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in k.bootstrap_servers.split(",") if s.strip()],
        "client_id": client_id,
        "request_timeout_ms": k.request_timeout_ms,
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = k.sasl_mechanism
        opts["sasl_plain_username"] = k.sasl_username
        if k.sasl_password is not None:
            opts["sasl_plain_password"] = k.sasl_password.get_secret_value()
    if k.security_protocol.endswith("SSL"):
        context = ssl.create_default_context(
            cafile=str(k.ssl_cafile) if k.ssl_cafile is not None else None
        )
        if k.ssl_certfile is not None:
            context.load_cert_chain(
                str(k.ssl_certfile), str(k.ssl_keyfile) if k.ssl_keyfile is not None else None
            )
        opts["ssl_context"] = context
    return opts


async def ensure_topics(
    k: KafkaSettings, client_id: str, wanted: dict[str, int], exact: Sequence[str] = ()
) -> dict[str, int]:
    """Create the topics of ``wanted`` (name -> partitions) that are missing; their partition
    counts. A topic of ``exact`` that exists with another count is a ``ConfigError``."""
    opts = connection_options(k, client_id)
    admin = AIOKafkaAdminClient(**opts)
    await admin.start()
    try:
        missing = [
            NewTopic(name, n, k.replication_factor)
            for name, n in wanted.items()
            if name not in set(await admin.list_topics())
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another node was first
                await admin.create_topics(missing)
        counts: dict[str, int] = {}
        for _ in range(50):  # a topic just created may not list its partitions yet
            for meta in await admin.describe_topics(list(wanted)):
                counts[meta["topic"]] = len(meta["partitions"])
            if all(counts.get(name) for name in wanted):
                break
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    for name in exact:
        if counts.get(name, wanted[name]) != wanted[name]:
            raise ConfigError(
                f"kafka topic {name!r} has {counts[name]} partitions but {wanted[name]} feeds are "
                "configured (one partition per feed, in [[exchanges]] order): delete the topic "
                "or set kafka.feeds_topic to a new name"
            )
    return counts


async def wait_for_topics(
    k: KafkaSettings, client_id: str, wanted: dict[str, int], exact: Sequence[str] = ()
) -> dict[str, int]:
    """``ensure_topics``, retried while the broker is unreachable (a node started first)."""
    delay = 0.5
    while True:
        try:
            return await ensure_topics(k, client_id, wanted, exact)
        except KafkaError as exc:
            log.warning("kafka_unreachable error=%r retry_in_s=%.1f", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def build_producer(k: KafkaSettings, client_id: str) -> AIOKafkaProducer:
    """Idempotent, acks=all, compressed and lingering: the ticks producer (ingest role)."""
    return AIOKafkaProducer(
        **connection_options(k, client_id),
        acks="all",
        enable_idempotence=True,
        compression_type=None if k.compression == "none" else k.compression,
        linger_ms=k.linger_ms,
        max_batch_size=k.max_batch_bytes,
        max_request_size=max(k.max_batch_bytes, 1_048_576),
    )


class KafkaSender:
    """``Sender`` over one producer: every record enqueued without waiting, then all their
    acknowledgements awaited together (one round trip per batch of batches, not per record).

    After a failed send the producer is replaced before the next one: an idempotent producer
    whose batches expired has a broken sequence (the broker answers OutOfOrderSequenceNumber
    to everything after), a new one starts a new producer id.

    An acknowledgement not come within ``ack_timeout_s`` counts as failed, whatever the
    client still waits for: a broker gone mid-request must turn into "down" (held back,
    spilled, and reconciled by record id before a resend), never into a send that hangs
    with the feeds behind it."""

    def __init__(
        self,
        factory: Callable[[], AIOKafkaProducer],
        close_timeout_s: float,
        ack_timeout_s: float | None = None,
    ) -> None:
        self._factory = factory
        self._close_timeout_s = close_timeout_s
        self._ack_timeout_s = ack_timeout_s if ack_timeout_s is not None else 3 * close_timeout_s
        self.producer = factory()
        self._broken = False
        self.replaced = 0

    async def start(self) -> None:
        await self.producer.start()

    async def aclose(self) -> None:
        await self._close(self.producer)

    async def _close(self, producer: AIOKafkaProducer) -> None:
        try:
            async with asyncio.timeout(self._close_timeout_s):
                await producer.stop()
        except (TimeoutError, KafkaError) as exc:
            log.warning("kafka_producer_close_failed error=%r", exc)

    async def _renew(self) -> None:
        old, self.producer = self.producer, self._factory()
        await self._close(old)
        await self.producer.start()  # KafkaError while the broker is away: tried again
        self._broken = False
        self.replaced += 1
        log.info("kafka_producer_replaced count=%d", self.replaced)

    async def send_all(self, records: Sequence[OutRecord]) -> list[Ack | BaseException]:
        if self._broken:
            try:
                await self._renew()
            except KafkaError as exc:
                return [exc] * len(records)
        futures: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        for r in records:
            try:
                futures.append(
                    await self.producer.send(r.topic, r.value, key=r.key, headers=r.headers)
                )
            except KafkaError as exc:  # no metadata / buffer full for request_timeout_ms
                error = exc
                break
        results: list[Ack | BaseException] = []
        if futures:
            await asyncio.wait(futures, timeout=self._ack_timeout_s)
        for fut in futures:
            if not fut.done():
                res: Any = KafkaTimeoutError(f"no acknowledgement in {self._ack_timeout_s} s")
            elif fut.cancelled():
                raise asyncio.CancelledError
            else:
                res = fut.exception() or fut.result()
            if isinstance(res, BaseException):
                error = error or res
                results.append(res)
            else:
                results.append((res.partition, res.offset))
        if error is not None:
            self._broken = True
        results += [error] * (len(records) - len(results))  # type: ignore[list-item]
        return results


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of ``topic`` as the cluster has them now (a consumer without a
    subscription keeps no metadata of its own: this asks; aiokafka is pinned)."""
    cluster = await consumer._client.fetch_all_metadata()
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
