"""The ingest role's hold-back publisher with a fake sender: the broker away means records are
held in memory (bounded), then spilled to a file (bounded), then the caller waits; when the
broker returns everything goes out once, oldest first. Nothing is dropped or doubled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from marketflow.adapters.kafka.publisher import (
    Ack,
    HoldBackPublisher,
    OutRecord,
    RecordSpillFile,
)


class FakeSender:
    """Acknowledges in order while up; ``down``: every record fails; ``refuse``: those fail."""

    def __init__(self) -> None:
        self.down = False
        self.refuse: set[bytes] = set()
        self.delivered: list[bytes] = []
        self.calls = 0

    async def send_all(self, records: Sequence[OutRecord]) -> list[Ack | BaseException]:
        self.calls += 1
        await asyncio.sleep(0)
        out: list[Ack | BaseException] = []
        for r in records:
            if self.down or r.value in self.refuse:
                out.append(ConnectionError("broker away"))
            else:
                self.delivered.append(r.value)
                out.append((0, len(self.delivered) - 1))
        return out


def recs(start: int, n: int, feed: str = "fx") -> list[OutRecord]:
    return [
        OutRecord(
            "ticks", b"BTCUSDT", f"v{i}".encode(), [("node", b"a")], feed, i + 1, 1,
            f"r{i}".encode(),
        )
        for i in range(start, start + n)
    ]  # fmt: skip


def values(start: int, n: int) -> list[bytes]:
    return [f"v{i}".encode() for i in range(start, start + n)]


async def until(check: object, what: str, steps: int = 20_000) -> None:
    for _ in range(steps):
        if callable(check) and check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"not reached: {what}")


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[tuple[FakeSender, HoldBackPublisher]]:
    sender = FakeSender()
    pub = HoldBackPublisher(
        sender, RecordSpillFile(tmp_path / "kafka.bin"), max_held=10, max_spilled=25,
        retry_s=0.005, chunk=4,
    )  # fmt: skip
    task = asyncio.create_task(pub.run())
    yield sender, pub
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_broker_up_publishes_at_once_and_reports_the_acks(tmp_path: Path) -> None:
    sender = FakeSender()
    acked: list[int | None] = []
    pub = HoldBackPublisher(
        sender, RecordSpillFile(tmp_path / "k.bin"), max_held=10, max_spilled=10,
        on_acked=lambda rs, _acks: acked.extend(r.mark for r in rs),
    )  # fmt: skip
    await pub.publish(recs(0, 3))
    assert sender.delivered == values(0, 3)
    assert acked == [1, 2, 3]
    assert pub.stats()["state"] == "up"
    assert pub.backlog == 0


async def test_broker_down_holds_back_then_spills_then_sends_everything_once_in_order(
    kit: tuple[FakeSender, HoldBackPublisher], tmp_path: Path
) -> None:
    sender, pub = kit
    sender.down = True
    await pub.publish(recs(0, 6))  # returns: held back, not lost
    assert pub.state == "down"
    assert len(pub.held) == 6
    assert pub.spilled == 0
    await pub.publish(recs(6, 9))  # 4 more fit in memory, 5 go to the file
    assert len(pub.held) == 10
    assert pub.spilled == 5
    assert pub.stats()["held_back"] == 10
    assert pub.stats()["spilled"] == 5
    assert (tmp_path / "kafka.bin").exists()
    await pub.publish(recs(15, 3))  # once something is spilled, newer records go after it
    assert len(pub.held) == 10
    assert pub.spilled == 8
    assert sender.delivered == []

    sender.down = False
    await until(lambda: pub.backlog == 0, "backlog published")
    assert sender.delivered == values(0, 18)
    assert pub.state == "up"
    assert not (tmp_path / "kafka.bin").exists()
    await pub.publish(recs(18, 2))
    assert sender.delivered == values(0, 20)


async def test_both_bounds_full_make_the_caller_wait_instead_of_dropping(
    kit: tuple[FakeSender, HoldBackPublisher],
) -> None:
    sender, pub = kit
    sender.down = True
    await pub.publish(recs(0, 35))  # 10 in memory + 25 on disk: full
    blocked = asyncio.create_task(pub.publish(recs(35, 5)))
    for _ in range(50):
        await asyncio.sleep(0.001)
    assert not blocked.done()  # the sink waits: the fan-in queue fills, the feeds pause
    assert pub.backlog == 35
    sender.down = False
    await blocked
    await until(lambda: pub.backlog == 0, "backlog published")
    assert sender.delivered == values(0, 40)


async def test_only_the_records_that_failed_are_sent_again(
    kit: tuple[FakeSender, HoldBackPublisher],
) -> None:
    sender, pub = kit
    sender.refuse = {b"v1", b"v3"}
    await pub.publish(recs(0, 5))
    assert sender.delivered == [b"v0", b"v2", b"v4"]
    assert len(pub.held) == 2
    sender.refuse = set()
    await until(lambda: pub.backlog == 0, "failed ones resent")
    assert sorted(sender.delivered) == sorted(values(0, 5))
    assert len(sender.delivered) == 5  # no acknowledged record sent twice


async def test_a_stop_with_the_broker_away_keeps_the_backlog_for_the_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kafka.bin"
    sender = FakeSender()
    sender.down = True
    pub = HoldBackPublisher(sender, RecordSpillFile(path), max_held=4, max_spilled=100, chunk=4)
    await pub.publish(recs(0, 7))  # 4 held, 3 spilled
    await pub.close(0.05)
    assert RecordSpillFile(path).count() == 7

    again = FakeSender()
    pub2 = HoldBackPublisher(again, RecordSpillFile(path), max_held=4, max_spilled=100, chunk=4)
    await pub2.recover()
    assert pub2.spilled == 7
    task = asyncio.create_task(pub2.run())
    await pub2.publish(recs(7, 2))  # newer than the file: queued behind it
    await until(lambda: pub2.backlog == 0, "kept records published")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert again.delivered == values(0, 9)
    assert not path.exists()


def test_a_torn_last_record_in_the_spill_file_ends_the_read(tmp_path: Path) -> None:
    spill = RecordSpillFile(tmp_path / "k.bin")
    spill.append(recs(0, 3))
    with spill.path.open("ab") as f:
        f.write(b"\x00\x00\x01\x00partial")
    got, _ = spill.read(0, 100)
    assert [r.value for r in got] == values(0, 3)
    assert got[2].mark == 3
    assert got[2].headers == [("node", b"a")]


async def test_records_written_despite_a_failed_send_are_not_sent_again(tmp_path: Path) -> None:
    """The broker wrote v1 and v2 but the answers were lost: reconcile finds them by rid."""
    sender = FakeSender()
    log_has: dict[bytes, tuple[int, int]] = {}
    asked: list[list[bytes]] = []

    async def reconcile(records: Sequence[OutRecord]) -> dict[bytes, tuple[int, int]]:
        asked.append([r.rid for r in records])
        if sender.down:
            raise ConnectionError("still away")
        return {r.rid: log_has[r.rid] for r in records if r.rid in log_has}

    acked: list[bytes] = []
    pub = HoldBackPublisher(
        sender, RecordSpillFile(tmp_path / "k.bin"), max_held=10, max_spilled=10,
        on_acked=lambda rs, _a: acked.extend(r.value for r in rs), retry_s=0.005,
        reconcile=reconcile,
    )  # fmt: skip
    task = asyncio.create_task(pub.run())
    try:
        sender.refuse = {b"v1", b"v2"}
        await pub.publish(recs(0, 4))  # v0, v3 acknowledged; v1, v2 "failed"
        log_has.update({b"r1": (0, 7), b"r2": (0, 8)})  # ... but are in the log
        sender.down = True
        sender.refuse = set()
        await pub.publish(recs(4, 2))
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert pub.backlog == 4  # reconcile cannot answer while the broker is away
        sender.down = False
        await until(lambda: pub.backlog == 0, "backlog published")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sender.delivered == [b"v0", b"v3", b"v4", b"v5"]  # v1, v2 never sent twice
    assert sorted(acked) == sorted(values(0, 6))
    assert pub.stats()["found_written"] == 2
    assert asked[-1] == [b"r1", b"r2", b"r4", b"r5"]
