"""What every aiokafka client of this node shares: connection and security options built from
``KafkaSettings`` (one place for SASL/TLS), the topic check, and the partitioner's rule.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2

from marketflow.settings import KafkaSettings

log = logging.getLogger("marketflow.kafka")


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Bootstrap servers, client id, timeouts and security, for any aiokafka client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = settings.sasl_mechanism
        opts["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            opts["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol.endswith("SSL"):
        opts["ssl_context"] = create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
            certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        )
    return opts


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
