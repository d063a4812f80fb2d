"""Feed ownership through Kafka's own group membership, and each feed's resume point.

The feeds topic has one partition per configured feed (partition i is the i-th exchange in
settings order). Every ingest node is a member of kafka.feeds_group subscribed to it; the
group gives each partition to exactly one live member, so each feed is read by one node.
``on_revoked`` runs before the group hands a partition to another member, and returns only
once the owner has stopped the feed and published what it read (the callback is awaited by
aiokafka's rejoin), so two owners never overlap. A node that cannot reach the coordinator
fences itself: after session_timeout minus one heartbeat interval without a successful
heartbeat it stops its feeds without waiting for a revoke (by then the group may have given
them away).

The same partition carries the feed's resume marks: after a feed's records are acknowledged,
its owner appends ``{"v":1,"feed","mark","next_out","node","at_ms","offsets"}`` (offsets: the
ticks topic's partition ends the owner had seen acknowledged). A new owner reads the last one,
then scans the ticks topic from those offsets for the feed's newer ``mark`` headers (records a
killed owner published after its last mark record), so it resumes exactly after them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from marketflow.adapters.kafka.producer import connection_options, partitions_of
from marketflow.settings import KafkaSettings

log = logging.getLogger("marketflow.kafka.feeds")


@dataclass(slots=True)
class ResumePoint:
    """Where a feed's previous owner left it (None: never owned, or no position)."""

    mark: int | None = None
    next_out: int | None = None
    node: str = ""
    offsets: dict[int, int] = field(default_factory=dict)


def mark_value(
    feed: str, mark: int, next_out: int | None, node: str, offsets: dict[int, int]
) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "feed": feed,
            "mark": mark,
            "next_out": next_out,
            "node": node,
            "at_ms": time.time_ns() // 1_000_000,
            "offsets": {str(p): o for p, o in offsets.items()},
        }
    )


def parse_mark(value: bytes | None, feed: str) -> ResumePoint | None:
    try:
        d = orjson.loads(value or b"")
        if d.get("feed") != feed or not isinstance(d.get("mark"), int):
            return None
        return ResumePoint(
            int(d["mark"]),
            int(d["next_out"]) if isinstance(d.get("next_out"), int) else None,
            str(d.get("node", "")),
            {int(p): int(o) for p, o in (d.get("offsets") or {}).items()},
        )
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        log.warning("feed_mark_unreadable feed=%s value=%r", feed, (value or b"")[:200])
        return None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, group: FeedGroup) -> None:
        self._group = group

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._group.revoked(sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._group.assigned(sorted(tp.partition for tp in assigned))


class FeedGroup:
    """This node's membership of the feeds group: starts and stops feeds as it is told."""

    def __init__(
        self,
        k: KafkaSettings,
        node: str,
        feeds: Sequence[str],
        start: Callable[[str, ResumePoint], Awaitable[None]],
        stop: Callable[[Sequence[str]], Awaitable[None]],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._k = k
        self._node = node
        self.feeds = list(feeds)
        self._start = start
        self._stop = stop
        self._monotonic = monotonic
        self.owned: list[str] = []
        self.fenced = False
        self.fences = 0
        self.rebalances = 0
        self._last_ok = monotonic()
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        k = self._k
        consumer = AIOKafkaConsumer(
            **connection_options(k, f"{k.client_id}-{self._node}-feeds"),
            group_id=k.feeds_group,
            enable_auto_commit=False,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            rebalance_timeout_ms=max(k.session_timeout_ms, 60_000),
            max_poll_interval_ms=max(k.session_timeout_ms * 10, 300_000),
            auto_offset_reset="latest",
        )
        consumer.subscribe([k.feeds_topic], listener=_Listener(self))
        await consumer.start()
        self._consumer = consumer
        self._watch_heartbeats(consumer)
        self._tasks = [
            asyncio.create_task(self._poll(consumer), name="feeds-poll"),
            asyncio.create_task(self._fence_watch(), name="feeds-fence"),
        ]

    def _watch_heartbeats(self, consumer: AIOKafkaConsumer) -> None:
        """Note each successful heartbeat (aiokafka keeps that time to itself; the version
        is pinned, so its coordinator's ``_do_heartbeat`` is a stable hook)."""
        coordinator: Any = getattr(consumer, "_coordinator", None)
        original = getattr(coordinator, "_do_heartbeat", None)
        if original is None:
            log.warning("feeds_fence_unavailable reason=no_heartbeat_hook")
            return

        async def heartbeat() -> bool:
            ok = bool(await original())
            if ok:
                self._last_ok = self._monotonic()
            return ok

        coordinator._do_heartbeat = heartbeat

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        # The group needs a polling member; the records (marks) are read on assignment.
        while True:
            await consumer.getmany(timeout_ms=1_000)

    async def _fence_watch(self) -> None:
        k = self._k
        limit = (k.session_timeout_ms - k.heartbeat_interval_ms) / 1000
        while True:
            await asyncio.sleep(k.heartbeat_interval_ms / 2000)
            silent = self._monotonic() - self._last_ok
            if self.owned and not self.fenced and silent > limit:
                self.fenced = True
                self.fences += 1
                owned, self.owned = self.owned, []
                log.error(
                    "feeds_fenced node=%s feeds=%s silent_s=%.1f reason=no_heartbeat",
                    self._node, ",".join(owned), silent,
                )  # fmt: skip
                await self._stop(owned)

    async def revoked(self, partitions: Sequence[int]) -> None:
        # aiokafka revokes eagerly (everything owned); a fenced node owns nothing any more,
        # and its stop() still waits until what it read is published.
        owned, self.owned = self.owned, []
        log.info("feeds_revoked node=%s feeds=%s", self._node, ",".join(owned))
        await self._stop(owned)

    async def assigned(self, partitions: Sequence[int]) -> None:
        self.rebalances += 1
        self._last_ok = self._monotonic()
        self.fenced = False
        names = [self.feeds[p] for p in partitions if p < len(self.feeds)]
        log.info("feeds_assigned node=%s feeds=%s", self._node, ",".join(names))
        for p, name in zip(partitions, names, strict=False):
            await self._start_one(p, name)

    async def _start_one(self, partition: int, name: str) -> None:
        """Start one assigned feed, retried for a while (a broker that answers the group but
        not yet a read or a write); a feed that cannot start stays unread and is logged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(30.0, self._k.session_timeout_ms / 1000)
        while True:
            try:
                point = await self.last_mark(partition, name)
                await self._start(name, point)
            except Exception as exc:
                if loop.time() > deadline:
                    log.exception("feed_start_failed node=%s feed=%s", self._node, name)
                    return
                log.warning("feed_start_retry node=%s feed=%s error=%r", self._node, name, exc)
                await asyncio.sleep(1.0)
            else:
                self.owned.append(name)
                return

    async def last_mark(self, partition: int, feed: str) -> ResumePoint:
        """The newest resume mark record on ``feed``'s partition (empty when none)."""
        k = self._k
        reader = AIOKafkaConsumer(
            **connection_options(k, f"{k.client_id}-{self._node}-marks"),
            enable_auto_commit=False,
        )
        await reader.start()
        try:
            tp = TopicPartition(k.feeds_topic, partition)
            reader.assign([tp])
            end = (await reader.end_offsets([tp]))[tp]
            begin = (await reader.beginning_offsets([tp]))[tp]
            if end <= begin:
                return ResumePoint()
            reader.seek(tp, end - 1)
            deadline = asyncio.get_running_loop().time() + k.request_timeout_ms / 1000
            while asyncio.get_running_loop().time() < deadline:
                got = await reader.getmany(tp, timeout_ms=500)
                for rec in got.get(tp, []):
                    point = parse_mark(rec.value, feed)
                    if point is not None:
                        return point
                if got:
                    break
            return ResumePoint()
        finally:
            await reader.stop()

    def owns(self, feed: str) -> bool:
        return feed in self.owned

    def stats(self) -> dict[str, object]:
        return {
            "group": self._k.feeds_group,
            "owned": list(self.owned),
            "fenced": self.fenced,
            "fences": self.fences,
            "rebalances": self.rebalances,
            "heartbeat_age_s": round(self._monotonic() - self._last_ok, 3),
        }

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()  # leaves the group: its feeds move at once, not after timeout


async def scan_marks(
    k: KafkaSettings, client_id: str, feed: str, offsets: dict[int, int]
) -> int | None:
    """The highest ``mark`` header of ``feed``'s records in the ticks topic after ``offsets``
    (per partition; a partition not named is scanned from the offset it had nothing before)."""
    reader = AIOKafkaConsumer(
        **connection_options(k, client_id), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await reader.start()
    best: int | None = None
    try:
        tps = await partitions_of(reader, k.ticks_topic)
        if not tps:
            return None
        reader.assign(tps)
        ends = await reader.end_offsets(tps)
        todo = {}
        for tp in tps:
            start = offsets.get(tp.partition)
            if start is None or start >= ends[tp]:
                continue
            reader.seek(tp, start)
            todo[tp] = ends[tp]
        want = feed.encode()
        deadline = asyncio.get_running_loop().time() + k.request_timeout_ms / 1000 * 4
        while todo and asyncio.get_running_loop().time() < deadline:
            got = await reader.getmany(*todo, timeout_ms=1_000, max_records=10_000)
            for tp, records in got.items():
                for rec in records:
                    hdr = dict(rec.headers)
                    mark = hdr.get("mark")
                    if mark is not None and hdr.get("feed") == want:
                        best = max(best or 0, int(mark))
                if await reader.position(tp) >= todo[tp]:
                    del todo[tp]
        if todo:
            log.warning("feed_mark_scan_incomplete feed=%s partitions=%s", feed, sorted(todo))
        return best
    finally:
        await reader.stop()
