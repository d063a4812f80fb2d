"""Replaying dead letters: records the aggregate role could not use, once fixed upstream (a
newer consumer that knows their schema version, a pair added to the config), go back to the
ticks topic.

``replay_dead_letters`` reads the dead-letter topic from an offset, decodes each record as the
aggregate role would (with this config's pairs and price bound) and re-publishes the valid
ones, key and value unchanged, to the ticks topic (idempotent producer, acks=all), with the
dead letter's origin in headers (``replayed_from``: "<topic>:<partition>:<offset>"). Records
still invalid stay where they are and are listed by reason. A replayed record is a new record:
it is aggregated once more, so replay a dead letter once (``--from-offset`` past the last
replayed one; the summary says where to start next time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from marketflow.adapters.kafka.client import client_options
from marketflow.adapters.kafka.records import RecordError, decode_record
from marketflow.settings import Settings

log = logging.getLogger("marketflow.kafka")


@dataclass
class ReplaySummary:
    read: int = 0
    replayed: int = 0
    still_invalid: dict[str, int] = field(default_factory=dict)
    next_offset: dict[int, int] = field(default_factory=dict)  # partition -> next to read

    def as_dict(self) -> dict[str, object]:
        return {
            "read": self.read,
            "replayed": self.replayed,
            "still_invalid": self.still_invalid,
            "next_offset": self.next_offset,
        }


async def replay_dead_letters(
    settings: Settings, from_offset: int = 0, *, dry_run: bool = False
) -> ReplaySummary:
    """Re-publish the dead letters at or after ``from_offset`` (each partition) that decode
    now; ``dry_run``: only count."""
    k = settings.kafka
    opts = client_options(k)
    consumer = AIOKafkaConsumer(**opts, enable_auto_commit=False)
    producer = AIOKafkaProducer(**opts, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    summary = ReplaySummary()
    symbols = frozenset(settings.pairs)
    max_price = settings.pipeline.max_price
    try:
        parts = await producer.partitions_for(k.dead_letter_topic)  # waits for metadata
        tps = [TopicPartition(k.dead_letter_topic, p) for p in sorted(parts)]
        if not tps:
            return summary
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(from_offset, starts[tp]))
            summary.next_offset[tp.partition] = max(from_offset, starts[tp])
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            got = await consumer.getmany(timeout_ms=1000)
            for tp, records in got.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        continue
                    summary.read += 1
                    summary.next_offset[tp.partition] = r.offset + 1
                    try:
                        decode_record(r.value, symbols=symbols, max_price=max_price)
                    except RecordError as exc:
                        n = summary.still_invalid.get(exc.reason, 0)
                        summary.still_invalid[exc.reason] = n + 1
                        continue
                    if not dry_run:
                        origin = f"{tp.topic}:{tp.partition}:{r.offset}".encode()
                        await producer.send(
                            k.ticks_topic,
                            key=r.key,
                            value=r.value,
                            headers=[("node", b"dead-letter-replay"), ("replayed_from", origin)],
                        )
                    summary.replayed += 1
        await producer.flush()
    finally:
        await producer.stop()
        await consumer.stop()
    log.info("dead_letters_replayed %s", summary.as_dict())
    return summary
