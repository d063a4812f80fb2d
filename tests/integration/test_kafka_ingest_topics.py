"""The ingest role's topics on a real broker: created when missing with the configured
partitions, and a feeds topic whose partition count is not the number of feeds refused."""

from __future__ import annotations

import uuid

import pytest

from marketflow.adapters.kafka.producer import ensure_topics
from marketflow.domain.errors import ConfigError
from marketflow.settings import KafkaSettings
from tests.harness.services import KafkaServer

pytestmark = pytest.mark.timeout(60)


async def test_topics_are_created_and_a_feeds_topic_of_another_size_is_refused(
    kafka_server: KafkaServer,
) -> None:
    k = KafkaSettings(bootstrap_servers=kafka_server.bootstrap)
    tag = uuid.uuid4().hex[:8]
    feeds, ticks = f"feeds-{tag}", f"ticks-{tag}"
    counts = await ensure_topics(k, "t", {feeds: 3, ticks: 5}, exact=[feeds])
    assert counts == {feeds: 3, ticks: 5}
    assert await ensure_topics(k, "t", {feeds: 3}, exact=[feeds]) == {feeds: 3}  # as it is
    with pytest.raises(ConfigError, match=r"has 3 partitions but 4 feeds are configured"):
        await ensure_topics(k, "t", {feeds: 4}, exact=[feeds])
    # Not an exact topic: an existing ticks topic is used with the partitions it has.
    assert await ensure_topics(k, "t", {ticks: 12}) == {ticks: 5}
