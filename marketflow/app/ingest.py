"""Ingest: per-source producer -> bounded source queue -> worker pool -> fan-in queue.

A source is a producer (a task that connects, reads and puts raw items on the source queue,
reconnecting by itself) and a parser (a pure function of one item into one TickBatch). Five
workers per source parse items concurrently with the producer's reads; the fan-in queue
carries whole batches to the aggregator. Both queues are bounded: when the aggregator falls
behind, workers block, the source queue fills, the producer stops reading and TCP flow
control pushes back on the exchange. Nothing is dropped. A ``ParseGate`` shared by every
source bounds the parsing per event-loop pass, so the loop's other work (HTTP requests,
socket reads, cache flushes) waits about one chunk's parse, not one per ready worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TypeVar

from marketflow.domain.feeds import Source
from marketflow.domain.ticks import TickBatch

log = logging.getLogger("marketflow.ingest")

ItemT = TypeVar("ItemT")
QItemT = TypeVar("QItemT")


class WeightedQueue(asyncio.Queue[QItemT]):
    """An ``asyncio.Queue`` whose ``maxsize`` counts slots, an item taking ``_weight`` of
    them (at least one): a bound on what is queued (bytes, ticks), not on how many items."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.slots = 0  # slots taken (== qsize() when every item weighs one)

    def _weight(self, item: QItemT) -> int:
        return 1

    def _put(self, item: QItemT) -> None:
        self.slots += self._weight(item)
        super()._put(item)

    def _get(self) -> QItemT:
        item: QItemT = super()._get()
        self.slots -= self._weight(item)
        return item

    def full(self) -> bool:
        return 0 < self.maxsize <= self.slots


class SourceQueue(WeightedQueue[tuple[ItemT, int]]):
    """The bounded queue between a producer and its workers.

    A producer cancelled while it waits for room (shutdown or a mode switch with the queue
    full) still holds an item it has read from the socket: that item is kept in ``held``, and
    the stopping source parses it, so nothing read is dropped.

    With ``slot_bytes``, a chunk of bytes takes ``len // slot_bytes`` of the ``maxsize``
    slots (at least one): reads that grow while behind (tcp_json) then queue the same bytes,
    not 4x as many, so a saturated feed lags by what the queue holds, not by more.
    """

    def __init__(self, maxsize: int, slot_bytes: int = 0) -> None:
        super().__init__(maxsize)
        self.held: list[tuple[ItemT, int]] = []
        self._slot_bytes = slot_bytes

    def _weight(self, item: tuple[ItemT, int]) -> int:
        data = item[0]
        if self._slot_bytes and isinstance(data, bytes):
            return max(1, len(data) // self._slot_bytes)
        return 1

    async def put(self, item: tuple[ItemT, int]) -> None:
        try:
            await super().put(item)
        except asyncio.CancelledError:
            self.held.append(item)
            raise


FANIN_SLOT_TICKS = 1024  # about a 64 KiB chunk of reference lines


class FaninQueue(WeightedQueue[TickBatch]):
    """The fan-in queue: ``maxsize`` slots of ``FANIN_SLOT_TICKS`` ticks, a batch taking at
    least one. Batches of grown reads (4,000 ticks and more) would otherwise queue 4x the
    ticks, and a saturated daemon lag by as much (45 s instead of ~10 at 500 x 10)."""

    def _weight(self, item: TickBatch) -> int:
        return max(1, item.count // FANIN_SLOT_TICKS)


class ParseGate:
    """A time budget for parsing per event-loop pass, shared by every source's workers.

    A pass is one round of the loop's ready callbacks; the selector is polled between two.
    The first worker in a pass always parses; later ones are admitted while less than
    ``budget_s`` has gone since that first admission, then wait: a released waiter is woken
    by a callback scheduled for the next pass (first come, first served), so a backlog is
    parsed a budget per pass with sockets, HTTP requests and flushes served in between.
    ``budget_s = 0``: no bound.
    """

    def __init__(self, budget_s: float) -> None:
        self._budget_s = budget_s
        self._pass_start = 0.0
        self._open = False  # this pass has admitted a parse (cleared by the next pass)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._next_pass_scheduled = False

    def backlog(self) -> bool:
        """Workers wait for a later pass: chunks are read but not yet parsed."""
        return bool(self._waiters)

    async def admit(self) -> None:
        """Return when this pass may run one more parse."""
        if self._budget_s <= 0:
            return
        if not self._waiters:
            if not self._open:
                self._open = True
                self._pass_start = time.perf_counter()
                self._schedule_next_pass()
                return
            if time.perf_counter() - self._pass_start < self._budget_s:
                return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._schedule_next_pass()
        await fut  # cancelled: the future is done, _next_pass skips it

    def _schedule_next_pass(self) -> None:
        if not self._next_pass_scheduled:
            self._next_pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_pass)

    def _next_pass(self) -> None:
        """Runs in the pass after one that parsed: admit the first waiter for the next."""
        self._next_pass_scheduled = False
        self._open = False
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # its worker runs in the next pass, as its first parse
                self._open = True
                self._pass_start = time.perf_counter()
                break
        if self._open or self._waiters:
            self._schedule_next_pass()


UNBOUNDED = ParseGate(0)


class RunningSource:
    """A started source: its producer task, its queue and its workers."""

    def __init__(
        self,
        source: Source[object],
        fanin: asyncio.Queue[TickBatch],
        workers: int,
        queue_size: int,
        gate: ParseGate = UNBOUNDED,
        slot_bytes: int = 0,
    ) -> None:
        """``queue_size`` chunks, or with ``slot_bytes`` that many chunks of that size."""
        self.source = source
        self._gate = gate
        self.queue: SourceQueue[object] = SourceQueue(queue_size, slot_bytes)
        self._fanin = fanin
        name = source.status.name
        self._producer = asyncio.create_task(
            source.producer.run(self.queue, source.status), name=f"producer:{name}"
        )
        self._workers = [
            asyncio.create_task(self._work(), name=f"worker:{name}:{i}") for i in range(workers)
        ]

    @property
    def name(self) -> str:
        return self.source.status.name

    async def _work(self) -> None:
        parse = self.source.parser.parse
        status = self.source.status
        queue = self.queue
        gate = self._gate
        while True:
            item, received_ms = await queue.get()
            try:
                # stop() cancels workers only once the queue is joined: no item waits here.
                await gate.admit()
                batch = parse(item, received_ms)
                if batch.count:
                    status.ticks += batch.count
                    status.last_tick_received_ms = received_ms
                if batch.count or batch.books or batch.mark is not None:  # a mark alone too
                    await self._fanin.put(batch)
                del batch  # not held while this worker waits (see below)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A parser bug must not kill the pool: count the item as rejected and go on.
                log.exception("parser_failed source=%s", status.name)
                status.rejects.add("parser_error", repr(item)[:200].encode())
            finally:
                # Only after the batch is on the fan-in queue: stop() joins on this.
                queue.task_done()
            # Not held while this worker waits: 50 idle workers at 500 x 10 kept a grown
            # read and its batch each (~100 MB at 1 MiB reads).
            item = None
            # get() and put() do not yield while there are items and room: without this one
            # worker would parse a whole backlog of chunks (~1 ms each) in one step. With
            # nothing queued, get() yields by itself (no extra task step per chunk).
            if queue.qsize():
                await asyncio.sleep(0)

    async def finished(self) -> None:
        """Wait until the producer ends by itself (a file source reaching its end)."""
        await asyncio.wait([self._producer])

    async def stop(self) -> None:
        """Stop reading, let the workers drain what was read, then stop them."""
        self._producer.cancel()
        await asyncio.gather(self._producer, return_exceptions=True)
        held, self.queue.held = self.queue.held, []
        for item in held:  # read before the stop, never queued: the workers take it still
            await self.queue.put(item)
        await self.queue.join()
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self.source.status.connected = False
