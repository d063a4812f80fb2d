"""What every aiokafka client of this node shares: connection and security options built from
``KafkaSettings`` (one place for SASL/TLS), the topic check, and the partitioner's rule.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from marketflow.adapters.kafka.producer import connection_options
from marketflow.settings import KafkaSettings

log = logging.getLogger("marketflow.kafka")


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Bootstrap servers, client id, timeouts and security, for any aiokafka client (one
    definition for both roles: producer.connection_options)."""
    return connection_options(settings, settings.client_id)


def partition_of(symbol: str, partitions: int) -> int:
    """The partition the default partitioner (murmur2 of the key, as Java's) gives
    ``symbol``'s records: the ingest role keys every record by its symbol."""
    return int(murmur2(symbol.encode()) & 0x7FFFFFFF) % partitions


async def ensure_topic(settings: KafkaSettings, topic: str, partitions: int) -> None:
    """Create ``topic`` with ``partitions`` partitions when it does not exist yet."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return
        new = NewTopic(topic, partitions, settings.replication_factor)
        try:
            await admin.create_topics([new])
        except TopicAlreadyExistsError:
            return  # another node made it meanwhile
        log.info("kafka_topic_created topic=%s partitions=%d", topic, partitions)
    except KafkaError as exc:
        log.warning("kafka_topic_check_failed topic=%s error=%r", topic, exc)
    finally:
        await admin.close()
