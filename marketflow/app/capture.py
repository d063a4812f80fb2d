"""FIX capture (audit trail): framed messages -> validate -> filter -> parse -> batch -> store.

The listener frames bytes per connection and calls ``submit`` with the frames of one read.
``submit`` validates and parses synchronously (the CPU work has to happen on this core
anyway) and appends to the pending batch. A full batch (``batch_max``), or whatever is pending
every ``flush_interval_ms``, goes on a small bounded queue; one writer task stores it. When the
store is slow or down, the queue fills, ``submit`` blocks, the connections stop reading and TCP
flow control pushes back on the senders: memory stays bounded, nothing is dropped. The writer
retries a failed batch with backoff (marketflow.backoff) until the store comes back.

Filters (CaptureSettings.filters): every ``include`` rule must match (the tag has one of the
values, in any occurrence), and no ``exclude`` rule may match. Filtered messages are counted,
not stored. Invalid messages are stored as rejects with their reason, never silently dropped.
Enrichment (tag names, enum meanings) follows from the static dictionary (the injected
``FieldDictionary``) and is done when the audit trail is read, not stored per message.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from marketflow.backoff import Backoff
from marketflow.domain.capture import (
    CapturedMessage,
    CaptureReject,
    CaptureStore,
    EnrichedField,
    FieldDictionary,
    MessageQuery,
    StoredMessage,
    StoredReject,
)
from marketflow.domain.errors import StoreUnavailable
from marketflow.settings import CaptureSettings

log = logging.getLogger("marketflow.capture")

Batch = tuple[list[CapturedMessage], list[CaptureReject]]


class MessageDecoder(Protocol):
    """Protocol-specific work (FIX): validation and parsing of one framed message."""

    def decode(self, frame: bytes, received_ms: int, peer: str) -> CapturedMessage:
        """The message with its header columns and parsed fields (also as JSON);
        raises InvalidMessage (bad field syntax, missing header tags ...)."""
        ...

    def decode_many(
        self, frames: Sequence[bytes], received_ms: int, peer: str
    ) -> tuple[list[CapturedMessage], list[tuple[str, bytes]]]:
        """``decode`` of the frames of one read, at once: the messages in order and, for each
        invalid frame, its reject reason with the frame."""
        ...


def reason_key(reason: str) -> str:
    """The counter key of a reject reason: its text before any ``:`` detail."""
    return reason.split(":", 1)[0]


class CaptureService:
    """The capture use case; also answers the audit-trail queries of the HTTP API."""

    def __init__(
        self,
        store: CaptureStore,
        settings: CaptureSettings,
        decoder: MessageDecoder,
        dictionary: FieldDictionary,
        *,
        queue_batches: int = 4,
        retry: Backoff | None = None,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self.store = store
        self._decoder = decoder
        self._dictionary = dictionary
        self._batch_max = settings.batch_max
        self._interval_s = settings.flush_interval_ms / 1000
        self._includes = [
            (f.tag, frozenset(f.values)) for f in settings.filters if f.action == "include"
        ]
        self._excludes = [
            (f.tag, frozenset(f.values)) for f in settings.filters if f.action == "exclude"
        ]
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(queue_batches)
        # Clear while the queue is full: every connection then waits before decoding more,
        # instead of each decoding one more batch into its hands first. That keeps the event
        # loop free for the writer (whose COPY results would otherwise wait behind a long round
        # of decoding) and bounds what is held to the queue plus one pending batch.
        self._room = asyncio.Event()
        self._room.set()
        self._messages: list[CapturedMessage] = []
        self._rejects: list[CaptureReject] = []
        self._backoff = retry or Backoff(0.1, 5.0, random.Random())  # a failed batch's retries
        self._drain_timeout_s = drain_timeout_s
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.accepted = 0
        self.filtered = 0
        self.stored = 0
        self.stored_rejects = 0
        self.bytes = 0
        self.store_errors = 0
        self.rejected: Counter[str] = Counter()

    async def start(self) -> None:
        """Start the writer and the flush timer (idempotent)."""
        if not self._tasks and not self._closed:
            self._tasks = [
                asyncio.create_task(self._write_loop(), name="capture:writer"),
                asyncio.create_task(self._tick_loop(), name="capture:flush"),
            ]

    async def __aenter__(self) -> CaptureService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(
        self,
        peer: str,
        received_ms: int,
        frames: Sequence[bytes],
        rejects: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Process the frames (and framing rejects) of one read; blocks while storage is behind."""
        if not self._room.is_set():
            await self._room.wait()
        for reason, raw in rejects:
            self._reject(peer, received_ms, reason, raw)
        messages, invalid = self._decoder.decode_many(frames, received_ms, peer)
        for reason, frame in invalid:
            self._reject(peer, received_ms, reason, frame)
        if self._includes or self._excludes:
            kept = [m for m in messages if self._keep(m.tags, m.values)]
            self.filtered += len(messages) - len(kept)
            messages = kept
        self._messages += messages
        self.bytes += sum(map(len, frames)) - sum(len(frame) for _, frame in invalid)
        self.accepted += len(messages)
        if len(self._messages) + len(self._rejects) >= self._batch_max:
            await self._enqueue()

    def _reject(self, peer: str, received_ms: int, reason: str, raw: bytes) -> None:
        self.rejected[reason_key(reason)] += 1
        self.bytes += len(raw)
        self._rejects.append(CaptureReject(received_ms, peer, reason, raw))

    def _keep(self, tags: Sequence[int], values: Sequence[str]) -> bool:
        fields = list(zip(tags, values, strict=True))
        for tag, wanted in self._includes:
            if not any(t == tag and v in wanted for t, v in fields):
                return False
        return not any(
            t == tag and v in unwanted for tag, unwanted in self._excludes for t, v in fields
        )

    async def _enqueue(self) -> None:
        if not self._messages and not self._rejects:
            return
        batch = (self._messages, self._rejects)
        # Swap before awaiting: other connections keep appending to the new lists meanwhile.
        self._messages, self._rejects = [], []
        await self._queue.put(batch)
        if self._queue.full():
            self._room.clear()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._enqueue()

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            messages, rejects = await queue.get()
            merged = 1
            # Batches that queued up while the store was busy go out in one write (one COPY).
            while not queue.empty() and len(messages) + len(rejects) < self._batch_max:
                more_messages, more_rejects = queue.get_nowait()
                messages += more_messages
                rejects += more_rejects
                merged += 1
            self._room.set()
            try:
                await self._write(messages, rejects)
            finally:
                for _ in range(merged):
                    queue.task_done()

    async def _write(self, messages: list[CapturedMessage], rejects: list[CaptureReject]) -> None:
        while True:
            try:
                refused = await self.store.write(messages, rejects)
            except StoreUnavailable as exc:
                self.store_errors += 1
                delay = self._backoff.fail()
                log.warning(
                    "capture_store_unavailable rows=%d retry_in_s=%.2f error=%s",
                    len(messages) + len(rejects), delay, exc,
                )  # fmt: skip
            except Exception:
                # A bug or an unexpected driver error: keep the batch and retry, like an outage.
                self.store_errors += 1
                delay = self._backoff.fail()
                log.exception("capture_store_failed rows=%d", len(messages) + len(rejects))
            else:
                self._backoff.reset()
                for reject in refused:
                    self.rejected[reason_key(reject.reason)] += 1
                self.stored += len(messages) - len(refused)
                self.stored_rejects += len(rejects) + len(refused)
                return
            await asyncio.sleep(delay)

    async def flush(self) -> None:
        """Hand over what is pending and wait until everything queued is stored."""
        await self._enqueue()
        await self._queue.join()

    def stats(self) -> dict[str, Any]:
        """Counters for /health and metrics."""
        return {
            "store": self.store.kind,
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "filtered": self.filtered,
            "stored": self.stored,
            "stored_rejects": self.stored_rejects,
            "bytes": self.bytes,
            "pending": len(self._messages) + len(self._rejects),
            "queued_batches": self._queue.qsize(),
            "store_errors": self.store_errors,
        }

    async def aclose(self) -> None:
        """Flush what is pending (waiting at most ``drain_timeout_s``), then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tasks:
            writer, ticker = self._tasks
            ticker.cancel()
            try:
                await asyncio.wait_for(self.flush(), self._drain_timeout_s)
            except TimeoutError:
                drained = False
            else:
                drained = True
            if not drained:
                # The store stayed down through shutdown: say plainly what was not written.
                left = self._queue.qsize() + len(self._messages) + len(self._rejects)
                log.error("capture_drain_timeout batches_or_rows_lost=%d", left)
            writer.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # Queries for the HTTP API: thin, so the routes depend on the use case, not the store.

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]:
        """Stored messages, newest first."""
        return await self.store.list_messages(query)

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """One stored message, or None."""
        return await self.store.get_message(message_id)

    async def list_rejects(self, limit: int, before_id: int | None = None) -> list[StoredReject]:
        """Stored rejects, newest first."""
        return await self.store.list_rejects(limit, before_id)

    def type_name(self, msg_type: str) -> str | None:
        """The name of a message type, e.g. "D" -> "NewOrderSingle" (read-time enrichment)."""
        return self._dictionary.meaning(35, msg_type)

    def enrich(self, fields: Sequence[tuple[int, str]]) -> list[EnrichedField]:
        """Stored (tag, value) pairs with their names and meanings (read-time enrichment)."""
        return self._dictionary.enrich(fields)
