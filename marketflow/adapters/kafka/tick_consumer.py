"""The aggregate role's Kafka consumer: tick records of the partitions this node owns, into
the aggregator's fan-in queue, each batch carrying its partition's next offset as its mark.

Offsets are managed by hand (no auto commit). The truth of where a partition resumes is the
mark stored with the state it produced (``kafka:<topic>:<partition>``, written in the same
Redis script as the seconds and the same PostgreSQL transaction as the rows): on assignment
the owner (app/partitions.py) restores the state of exactly those partitions' symbols and
this consumer seeks each partition to the restored mark (or the beginning); on revocation
the owner flushes and forgets them first, then Kafka's committed offsets are moved to the
stored marks. Kafka's committed offsets follow the marks after every cache write too; they
are informational (monitoring, tools), never where this node resumes.

A fetch is handed on per partition and exchange (one queue item for many records), the mark
on the last item of the partition's fetch. A fetch that spans an assignment is dropped whole
(``_epoch``) and its partitions sought back to where this node is: its records may predate
the assignment's seeks. A record that fails to decode
or validate is counted by reason, logged (sampled: the 1st, 2nd, 4th ... of a reason),
copied to the dead-letter topic with its origin in headers, and skipped: the mark moves
past it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from marketflow.adapters.kafka.client import client_options, ensure_topic, partition_of
from marketflow.adapters.kafka.records import RecordError, decode_record
from marketflow.domain.aggregates import Mark
from marketflow.domain.ticks import RejectCounts, TickBatch
from marketflow.settings import KafkaSettings

log = logging.getLogger("marketflow.kafka")

FETCH_TIMEOUT_MS = 200
FETCH_MAX_RECORDS = 5000
COMMIT_EVERY_S = 1.0
PROBE_EVERY_S = 2.0
DEAD_LETTER_ATTEMPTS = 5
FAULT_EXIT_CODE = 86  # the test fault's exit status (see KafkaSettings.test_fault)


def mark_source(topic: str, partition: int) -> str:
    """The mark's source name of one partition of ``topic``."""
    return f"kafka:{topic}:{partition}"


class PartitionOwner(Protocol):
    """The state side of partitions (app.partitions.PartitionOwner)."""

    async def take(self, sources: Sequence[str], owns: Callable[[str], bool]) -> None:
        """Restore the state of the symbols ``owns`` accepts and the marks of ``sources``."""
        ...

    async def release(self, sources: Sequence[str], owns: Callable[[str], bool]) -> dict[str, int]:
        """Flush, then forget, those symbols and sources; the positions made durable."""
        ...

    def position(self, source: str) -> int | None:
        """Where ``source`` resumes (its next offset), None: from the beginning."""
        ...


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: KafkaTickConsumer) -> None:
        self._c = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._c.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._c.assigned(assigned)


def _merge(into: TickBatch, b: TickBatch) -> None:
    """Add record batch ``b`` (one symbol of the same exchange) to ``into``."""
    for symbol, points in b.by_symbol.items():
        got = into.by_symbol.get(symbol)
        if got is None:
            into.by_symbol[symbol] = points
        else:
            got.extend(points)
    for key, f in b.folded.items():
        have = into.folded.get(key)
        if have is None:
            into.folded[key] = f
            continue
        have[0] = min(have[0], f[0])
        have[1] = max(have[1], f[1])
        have[2] += f[2]
        have[3] += f[3]
        if f[4] >= have[4]:
            have[4], have[5] = f[4], f[5]
    into.books.extend(b.books)
    into.count += b.count
    into.received_ms = min(into.received_ms, b.received_ms)


class KafkaTickConsumer:
    """One member of ``kafka.aggregate_group`` over ``kafka.ticks_topic``."""

    def __init__(
        self,
        settings: KafkaSettings,
        node_id: str,
        fanin: asyncio.Queue[TickBatch],
        owner: PartitionOwner,
        *,
        symbols: frozenset[str] | None,
        max_price: float,
        clock: Callable[[], int],
    ) -> None:
        self._s = settings
        self._topic = settings.ticks_topic
        self._node = node_id
        self._fanin = fanin
        self._owner = owner
        self._symbols = symbols
        self._max_price = max_price
        self._clock = clock
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()  # hand-on of a fetch vs. a change of assignment
        self._epoch = 0  # bumped by every assignment: older fetches are dropped
        self._owned: set[int] = set()
        self._partitions = settings.ticks_partitions
        self._next: dict[int, int] = {}  # partition -> next offset handed on (lag)
        self._to_commit: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        self._commit_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.rejects = RejectCounts(on_sample=self._log_sample)
        self._where = ""
        self.dead_lettered = 0
        self.dead_letter_failed = 0
        self.records = 0
        self.rebalances = 0
        self.broker_error = ""
        self._connected = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        s = self._s
        await ensure_topic(s, self._topic, s.ticks_partitions)
        opts = client_options(s)
        self._dlq = AIOKafkaProducer(**opts, acks="all", enable_idempotence=True)
        await self._dlq.start()
        self._consumer = AIOKafkaConsumer(
            **opts,
            group_id=s.aggregate_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=max(s.session_timeout_ms, 30_000),
            isolation_level="read_committed",
        )
        self._consumer.subscribe([self._topic], listener=_Listener(self))
        await self._consumer.start()
        self._tasks = [
            asyncio.create_task(self._run(), name="kafka-ticks"),
            asyncio.create_task(self._commit_loop(), name="kafka-commit"),
            asyncio.create_task(self._probe(), name="kafka-probe"),
        ]

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The fetch, commit and probe tasks (the daemon stops when one of them dies)."""
        return list(self._tasks)

    async def aclose(self) -> None:
        """Stop fetching, hand every partition back (flushed, offsets committed), leave the
        group; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            owned = {TopicPartition(self._topic, p) for p in self._owned}
            await self.revoked(owned)
            await self._consumer.stop()
        if self._dlq is not None:
            await self._dlq.stop()

    # -- assignment --------------------------------------------------------------------------

    def _owns(self, partitions: set[int]) -> Callable[[str], bool]:
        total = self._partitions
        return lambda symbol: partition_of(symbol, total) in partitions

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        parts = {tp.partition for tp in assigned if tp.topic == self._topic}
        async with self._lock:
            self._epoch += 1
            self.rebalances += 1
            known = consumer.partitions_for_topic(self._topic)
            if known:
                self._partitions = len(known)
            new = parts - self._owned
            if new:
                sources = [mark_source(self._topic, p) for p in sorted(new)]
                await self._owner.take(sources, self._owns(new))
            for p in sorted(parts):
                tp = TopicPartition(self._topic, p)
                pos = self._owner.position(mark_source(self._topic, p)) or 0
                # Offset 0 of a log whose head was deleted is out of range: the consumer
                # resets it to the earliest offset (auto_offset_reset). seek_to_beginning()
                # would wait here for a reset the rebalance in progress holds up.
                consumer.seek(tp, pos)
                self._next[p] = pos
            self._owned = parts
            # Again after the seeks: a fetch begun while they were awaited may hold records
            # of the positions before them.
            self._epoch += 1
        log.info(
            "kafka_assigned node=%s partitions=%s positions=%s",
            self._node,
            sorted(parts),
            {p: self._next.get(p) for p in sorted(parts)},
        )

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            self._epoch += 1
            parts = {tp.partition for tp in revoked if tp.topic == self._topic} & self._owned
            self._owned -= parts
        if not parts:
            return
        sources = {mark_source(self._topic, p): p for p in parts}
        try:
            positions = await self._owner.release(list(sources), self._owns(parts))
        except Exception:
            log.exception("kafka_release_failed partitions=%s", sorted(parts))
            return
        finally:
            for p in parts:
                self._next.pop(p, None)
                self._to_commit.pop(p, None)
        log.info("kafka_revoked node=%s partitions=%s positions=%s", self._node, sorted(parts),
                 positions)  # fmt: skip
        await self._commit({sources[s]: pos for s, pos in positions.items() if s in sources})

    # -- fetching ----------------------------------------------------------------------------

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            epoch = self._epoch
            try:
                got = await consumer.getmany(
                    timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS
                )
            except KafkaError as exc:
                self.broker_error = repr(exc)
                log.warning("kafka_fetch_failed error=%r", exc)
                await asyncio.sleep(1.0)
                continue
            self.broker_error = ""
            if not got:
                continue
            async with self._lock:
                if epoch != self._epoch:
                    self._refetch(got)
                    continue
                for tp, records in got.items():
                    if tp.partition not in self._owned or not records:
                        continue
                    nxt = self._next.get(tp.partition, 0)
                    if records[0].offset < nxt:  # never hand on twice (belt and braces)
                        records = [r for r in records if r.offset >= nxt]
                    if records:
                        await self._hand_on(tp, records)

    def _refetch(self, got: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """A fetch that spanned an assignment: its records may predate the seeks, or be the
        first after them. Dropped, and each owned partition is sought back to where this node
        is, so whatever was dropped is fetched again."""
        consumer = self._consumer
        assert consumer is not None
        for tp in got:
            if tp.partition in self._owned:
                consumer.seek(tp, self._next.get(tp.partition, 0))

    async def _hand_on(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        batches: dict[str, TickBatch] = {}
        bad: list[tuple[ConsumerRecord[Any, Any], str]] = []
        symbols, max_price = self._symbols, self._max_price
        for r in records:
            try:
                b = decode_record(r.value, symbols=symbols, max_price=max_price)
            except RecordError as exc:
                bad.append((r, exc.reason))
                continue
            have = batches.get(b.exchange)
            if have is None:
                batches[b.exchange] = b
            else:
                _merge(have, b)
        self.records += len(records)
        if bad:
            await self._dead_letter(tp, bad)
        nxt = records[-1].offset + 1
        items = list(batches.values()) or [TickBatch("kafka", {}, self._clock(), 0)]
        items[-1].mark = nxt
        items[-1].mark_source = mark_source(self._topic, tp.partition)
        for b in items:
            await self._fanin.put(b)
        self._next[tp.partition] = nxt

    # -- bad records -------------------------------------------------------------------------

    def _log_sample(self, reason: str, count: int, raw: bytes) -> None:
        log.warning("kafka_record_rejected reason=%s count=%d %s raw=%r",
                    reason, count, self._where, raw[:120])  # fmt: skip

    async def _dead_letter(
        self, tp: TopicPartition, bad: list[tuple[ConsumerRecord[Any, Any], str]]
    ) -> None:
        """Count, log (sampled), copy to the dead-letter topic; retried a few times, then
        counted as failed: a partition never stops for its dead letters."""
        for r, reason in bad:
            self._where = f"topic={tp.topic} partition={tp.partition} offset={r.offset}"
            self.rejects.add(reason, r.value or b"")
        producer = self._dlq
        assert producer is not None
        for attempt in range(1, DEAD_LETTER_ATTEMPTS + 1):
            try:
                futures = [
                    await producer.send(
                        self._s.dead_letter_topic,
                        value=r.value,
                        key=r.key,
                        headers=[
                            ("source_topic", tp.topic.encode()),
                            ("source_partition", str(tp.partition).encode()),
                            ("source_offset", str(r.offset).encode()),
                            ("reason", reason.encode()),
                            ("node", self._node.encode()),
                        ],
                    )
                    for r, reason in bad
                ]
                await asyncio.gather(*futures)
            except KafkaError as exc:
                log.warning("kafka_dead_letter_failed attempt=%d records=%d error=%r",
                            attempt, len(bad), exc)  # fmt: skip
                await asyncio.sleep(min(2.0, 0.2 * attempt))
                continue
            self.dead_lettered += len(bad)
            return
        self.dead_letter_failed += len(bad)
        log.error("kafka_dead_letter_lost records=%d offsets=%s", len(bad),
                  [r.offset for r, _ in bad])  # fmt: skip

    # -- committing --------------------------------------------------------------------------

    def flushed(self, marks: Mapping[str, Mark]) -> None:
        """The aggregator's cache write carried ``marks``: commit ours after it (at most once
        a second). Called per flush, never per tick."""
        prefix = f"kafka:{self._topic}:"
        for source, (pos, _) in marks.items():
            if source.startswith(prefix):
                self._to_commit[int(source[len(prefix) :])] = pos
        self._commit_due.set()

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_due.wait()
            self._commit_due.clear()
            offsets, self._to_commit = self._to_commit, {}
            offsets = {
                p: o for p, o in offsets.items() if p in self._owned and self._committed.get(p) != o
            }
            if offsets and self._s.test_fault == "exit_after_flush_before_commit":
                # Test only: die right after a flush wrote the cache, before the commit.
                log.warning("kafka_test_fault exit offsets=%s", offsets)
                logging.shutdown()
                os._exit(FAULT_EXIT_CODE)
            await self._commit(offsets)
            await asyncio.sleep(COMMIT_EVERY_S)

    async def _commit(self, offsets: dict[int, int]) -> None:
        consumer = self._consumer
        if not offsets or consumer is None:
            return
        owned = self._owned
        tps = {TopicPartition(self._topic, p): o for p, o in offsets.items()}
        try:
            await consumer.commit(tps)
        except KafkaError as exc:  # informational: the stored marks are the truth
            log.warning("kafka_commit_failed offsets=%s error=%r", offsets, exc)
            for p, o in offsets.items():
                if p in owned:
                    self._to_commit.setdefault(p, o)
            return
        self._committed.update(offsets)

    # -- diagnostics -------------------------------------------------------------------------

    def lag_by_partition(self) -> dict[str, int]:
        """Per owned partition (its mark source name): highwater - next offset handed on."""
        consumer = self._consumer
        out: dict[str, int] = {}
        if consumer is None:
            return out
        for p in sorted(self._owned):
            hw = consumer.highwater(TopicPartition(self._topic, p))
            if hw is not None:
                out[mark_source(self._topic, p)] = max(0, hw - self._next.get(p, 0))
        return out

    async def _probe(self) -> None:
        """Broker connectivity for /health: a metadata round trip every probe interval."""
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                async with asyncio.timeout(PROBE_EVERY_S):
                    await consumer.topics()
            except (KafkaError, TimeoutError) as exc:
                if self._connected:
                    log.warning("kafka_broker_unreachable error=%r", exc)
                self._connected = False
            else:
                if not self._connected:
                    log.info("kafka_broker_reachable")
                self._connected = True
            await asyncio.sleep(PROBE_EVERY_S)

    def connected(self) -> bool:
        return self._connected and not self._closed

    def status(self) -> dict[str, Any]:
        """The /health ``kafka`` section of the aggregate role."""
        return {
            "role": "aggregate",
            "topic": self._topic,
            "group": self._s.aggregate_group,
            "connected": self.connected(),
            "broker_error": self.broker_error or None,
            "partitions": sorted(self._owned),
            "partitions_total": self._partitions,
            "lag": self.lag_by_partition(),
            "committed": {mark_source(self._topic, p): o for p, o in self._committed.items()},
            "records": self.records,
            "rebalances": self.rebalances,
            "bad_records": dict(self.rejects.counts),
            "dead_lettered": self.dead_lettered,
            "dead_letter_failed": self.dead_letter_failed,
        }
