"""The source queue bounds what it holds in chunks of ``slot_bytes``: reads that grew while
the feed was behind take as many slots as base-size reads of the same bytes would."""

from __future__ import annotations

import asyncio

from marketflow.app.ingest import FANIN_SLOT_TICKS, FaninQueue, SourceQueue
from marketflow.domain.ticks import TickBatch


async def test_grown_chunks_take_the_slots_of_their_size_and_give_them_back() -> None:
    q: SourceQueue[bytes] = SourceQueue(8, slot_bytes=1024)
    q.put_nowait((b"x" * 4096, 1))  # 4 slots
    q.put_nowait((b"x" * 100, 2))  # a short read: still one
    q.put_nowait((b"x" * 2048, 3))  # 2
    assert (q.qsize(), q.slots, q.full()) == (3, 7, False)
    q.put_nowait((b"x" * 1024, 4))
    assert (q.slots, q.full()) == (8, True)
    waiting = asyncio.create_task(q.put((b"y", 5)))
    await asyncio.sleep(0)
    assert not waiting.done()  # full by bytes, with four items queued of eight
    assert q.get_nowait()[1] == 1  # frees 4 slots
    await asyncio.wait_for(waiting, 1)
    assert (q.qsize(), q.slots) == (4, 5)
    assert [q.get_nowait()[1] for _ in range(4)] == [2, 3, 4, 5]
    assert (q.slots, q.empty()) == (0, True)


async def test_without_slot_bytes_every_item_is_one_slot() -> None:
    q: SourceQueue[object] = SourceQueue(2)
    q.put_nowait((b"x" * 100_000, 1))
    q.put_nowait(("not bytes", 2))
    assert (q.slots, q.full()) == (2, True)


async def test_the_fanin_queue_counts_ticks_in_slots_of_a_64k_chunk() -> None:
    q = FaninQueue(4)
    small = TickBatch("ex", {}, 0, 10)  # a short read: one slot
    big = TickBatch("ex", {}, 0, 3 * FANIN_SLOT_TICKS + 5)  # a grown read: three
    q.put_nowait(small)
    q.put_nowait(big)
    assert (q.qsize(), q.slots, q.full()) == (2, 4, True)
    assert q.get_nowait() is small
    assert (q.slots, q.full()) == (3, False)
