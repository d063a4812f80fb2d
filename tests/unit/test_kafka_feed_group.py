"""Feed ownership without a broker: resume marks as written and read, the self-fence when
heartbeats stop, and a revoke that returns only once the feeds are stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from marketflow.adapters.kafka.feed_group import FeedGroup, ResumePoint, mark_value, parse_mark
from marketflow.settings import KafkaSettings

K = KafkaSettings(
    bootstrap_servers="127.0.0.1:1", session_timeout_ms=600, heartbeat_interval_ms=100
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Feeds:
    def __init__(self) -> None:
        self.started: list[tuple[str, ResumePoint]] = []
        self.stopped: list[list[str]] = []
        self.stop_done = asyncio.Event()
        self.stop_done.set()

    async def start(self, name: str, point: ResumePoint) -> None:
        self.started.append((name, point))

    async def stop(self, names: Sequence[str]) -> None:
        await self.stop_done.wait()
        self.stopped.append(list(names))


def group(feeds: Feeds, clock: Clock) -> FeedGroup:
    g = FeedGroup(K, "n1", ["fx", "j1", "j2"], feeds.start, feeds.stop, monotonic=clock)

    async def no_marks(partition: int, feed: str) -> ResumePoint:
        return ResumePoint()

    g.last_mark = no_marks  # type: ignore[method-assign]
    return g


def test_a_mark_record_reads_back_for_its_own_feed_only() -> None:
    value = mark_value("fx", 917, 13, "na", {0: 5, 3: 12})
    point = parse_mark(value, "fx")
    assert point == ResumePoint(917, 13, "na", {0: 5, 3: 12})
    assert parse_mark(value, "other") is None
    assert parse_mark(b"not json", "fx") is None
    assert parse_mark(None, "fx") is None


async def test_assigned_partitions_start_their_feeds_in_settings_order() -> None:
    feeds, clock = Feeds(), Clock()
    g = group(feeds, clock)
    await g.assigned([0, 2])
    assert [n for n, _ in feeds.started] == ["fx", "j2"]
    assert g.owned == ["fx", "j2"]


async def test_a_revoke_returns_only_after_the_feeds_stopped() -> None:
    feeds, clock = Feeds(), Clock()
    g = group(feeds, clock)
    await g.assigned([1])
    feeds.stop_done.clear()
    revoke = asyncio.create_task(g.revoked([1]))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not revoke.done()  # the group waits: no other node may start j1 yet
    feeds.stop_done.set()
    await revoke
    assert feeds.stopped == [["j1"]]
    assert g.owned == []


async def test_no_heartbeat_for_most_of_the_session_fences_the_feeds() -> None:
    feeds, clock = Feeds(), Clock()
    g = group(feeds, clock)
    await g.assigned([0, 1])
    watch = asyncio.create_task(g._fence_watch())
    try:
        clock.now += 0.45  # below session - heartbeat (0.5 s): still ours
        await asyncio.sleep(0.12)
        assert feeds.stopped == []
        clock.now += 0.1
        for _ in range(100):
            if feeds.stopped:
                break
            await asyncio.sleep(0.02)
        assert feeds.stopped == [["fx", "j1"]]
        assert g.fenced
        assert g.owned == []
        # The rejoin's revoke then finds nothing to stop twice; an assignment unfences.
        await g.revoked([0, 1])
        assert feeds.stopped[-1] == []
        await g.assigned([2])
        assert not g.fenced
        assert g.owned == ["j2"]
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_a_feed_that_fails_to_start_is_tried_again_before_the_next_one() -> None:
    feeds, clock = Feeds(), Clock()
    g = group(feeds, clock)
    failures = [RuntimeError("broker not ready")]
    start = feeds.start

    async def flaky(name: str, point: ResumePoint) -> None:
        if failures:
            raise failures.pop()
        await start(name, point)

    g._start = flaky
    await g.assigned([0, 1])
    assert [n for n, _ in feeds.started] == ["fx", "j1"]
    assert g.owned == ["fx", "j1"]
