"""Publishing with the broker away: hold back (bounded, in memory), then spill, never drop.

While the broker answers, records go straight to the producer and ``publish`` returns once
they are acknowledged. When a send fails (broker down, request timed out) the publisher turns
``down``: the records that were not acknowledged, and everything after them, wait in order —
first in memory up to ``max_held`` records (kafka.hold_back_max_records), then in an append-only
spill file up to ``max_spilled`` (kafka.spill_max_records). Beyond both, ``publish`` waits: the
caller stops taking from the fan-in queue and TCP flow control pushes back on the feeds. A
resender task retries the oldest records first (memory, then the file) once a second and turns
the publisher ``up`` when a send goes through.

Exactness: every record reaches the broker, once. A record is sent again only after its own
send failed; the idempotent producer's internal retries are never doubled, and a failed send
the broker had written all the same (the answer lost) is found by ``reconcile`` (the records'
``rid`` looked up in the topic) before the held records are sent again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

log = logging.getLogger("marketflow.kafka.publisher")

Headers = list[tuple[str, bytes]]
Ack = tuple[int, int]  # (partition, offset) of an acknowledged record


@dataclass(slots=True)
class OutRecord:
    """One record to publish; ``feed`` and ``mark`` say whose resume point it carries."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)
    feed: str = ""
    mark: int | None = None
    ticks: int = 0
    rid: bytes = b""  # unique per record (header ``rid``): found again after a failed send


Reconcile = Callable[[Sequence["OutRecord"]], Awaitable[dict[bytes, Ack]]]
"""Which of these records the topic already holds (by ``rid``), with where."""


class Sender(Protocol):
    """Sends records; per record, its ``Ack`` or the exception its send ended with."""

    async def send_all(self, records: Sequence[OutRecord]) -> list[Ack | BaseException]: ...


class _Spilled(msgspec.Struct, array_like=True):
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    feed: str
    mark: int | None
    ticks: int
    rid: bytes = b""


_LEN = struct.Struct(">I")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Spilled)


class RecordSpillFile:
    """Length-prefixed msgpack records, appended and fsynced, read back from an offset. A torn
    last record (a crash mid-append) is logged and ends the read. Blocking: run in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def count(self, offset: int = 0) -> int:
        return len(self.read(offset, 1 << 62)[0])

    def append(self, records: Sequence[OutRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        parts: list[bytes] = []
        for r in records:
            body = _enc.encode(
                _Spilled(r.topic, r.key, r.value, r.headers, r.feed, r.mark, r.ticks, r.rid)
            )
            parts += (_LEN.pack(len(body)), body)
        with self.path.open("ab") as f:
            f.write(b"".join(parts))
            f.flush()
            os.fsync(f.fileno())

    def read(self, offset: int, limit: int) -> tuple[list[OutRecord], int]:
        """Up to ``limit`` records from byte ``offset`` and the offset after them."""
        out: list[OutRecord] = []
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return out, offset
        with f:
            f.seek(offset)
            while len(out) < limit:
                head = f.read(_LEN.size)
                if len(head) < _LEN.size:
                    break
                (n,) = _LEN.unpack(head)
                body = f.read(n)
                if len(body) < n:
                    log.error("kafka_spill_torn path=%s offset=%d", self.path, offset)
                    break
                s = _dec.decode(body)
                out.append(
                    OutRecord(
                        s.topic, s.key, s.value, list(s.headers), s.feed, s.mark, s.ticks, s.rid
                    )
                )
                offset = f.tell()
            return out, offset

    def rewrite(self, front: Sequence[OutRecord], offset: int) -> None:
        """The file as ``front`` followed by its records from ``offset`` (a stop keeps the
        records held in memory, which are older than the spilled ones, in order)."""
        rest, _ = self.read(offset, 1 << 62)
        tmp = self.path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        RecordSpillFile(tmp).append([*front, *rest])
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class HoldBackPublisher:
    """Publishes in order, holding back while the broker is away (see the module doc)."""

    def __init__(
        self,
        sender: Sender,
        spill: RecordSpillFile,
        *,
        max_held: int,
        max_spilled: int,
        on_acked: Callable[[Sequence[OutRecord], Sequence[Ack]], None] | None = None,
        retry_s: float = 1.0,
        chunk: int = 5_000,
        reconcile: Reconcile | None = None,
    ) -> None:
        self._sender = sender
        self._spill = spill
        self.max_held = max_held
        self.max_spilled = max_spilled
        self._on_acked = on_acked
        self._retry_s = retry_s
        self._chunk = max(1, min(chunk, max_held))
        self.held: collections.deque[OutRecord] = collections.deque()
        self.spilled = 0
        self._read_at = 0  # byte offset of the oldest spilled record not yet loaded
        self._file_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.state = "up"
        self.last_error = ""
        self.published = 0
        self.failures = 0
        # After a failed send, some "failed" records may be in the log all the same (written,
        # the answer lost): ``reconcile`` finds them before anything is sent again.
        self._reconcile = reconcile
        self._suspect = False
        self.reconciled = 0

    # -- what /health shows -----------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        return {
            "state": self.state,
            "held_back": len(self.held),
            "spilled": self.spilled,
            "published_records": self.published,
            "send_failures": self.failures,
            "found_written": self.reconciled,
            "last_error": self.last_error or None,
        }

    @property
    def backlog(self) -> int:
        return len(self.held) + self.spilled

    async def recover(self) -> None:
        """Adopt records spilled by an earlier run: they are published before anything new."""
        n = await asyncio.to_thread(self._spill.count)
        if n:
            log.warning("kafka_spill_found path=%s records=%d", self._spill.path, n)
            self.spilled = n
            self._idle.clear()
            self._wake.set()

    async def publish(self, records: Sequence[OutRecord]) -> None:
        """Returns once ``records`` are acknowledged, or held back or spilled behind older
        ones; waits while both bounds are full (back-pressure)."""
        if not records:
            return
        if self.state == "up" and not self.backlog:
            failed = await self._send(records)
            if not failed:
                return
            records = failed
        await self._hold(records)

    async def drained(self) -> None:
        """Until nothing is held back or spilled (everything handed over is acknowledged)."""
        await self._idle.wait()

    async def _send(self, records: Sequence[OutRecord]) -> list[OutRecord]:
        """Send; the records that failed (in order), after reporting the acknowledged ones."""
        results = await self._sender.send_all(records)
        acked: list[OutRecord] = []
        acks: list[Ack] = []
        failed: list[OutRecord] = []
        error: BaseException | None = None
        for rec, res in zip(records, results, strict=True):
            if isinstance(res, BaseException):
                failed.append(rec)
                error = error or res
            else:
                acked.append(rec)
                acks.append(res)
        self.published += len(acked)
        if acked and self._on_acked is not None:
            self._on_acked(acked, acks)
        if error is not None:
            self._suspect = True
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            if self.state == "up":
                log.warning(
                    "kafka_down error=%s unacknowledged=%d action=hold_back",
                    self.last_error, len(failed),
                )  # fmt: skip
            self.state = "down"
        elif acked:
            if self.state == "down":
                log.info("kafka_up held_back=%d spilled=%d", len(self.held), self.spilled)
            self.state = "up"
        return failed

    async def _hold(self, records: Sequence[OutRecord]) -> None:
        pending = list(records)
        self._idle.clear()
        while pending:
            if not self.spilled and len(self.held) < self.max_held:
                room = self.max_held - len(self.held)
                self.held.extend(pending[:room])
                pending = pending[room:]
                continue
            if self.spilled < self.max_spilled:
                async with self._file_lock:
                    if not self.spilled and len(self.held) < self.max_held:
                        continue  # the file drained meanwhile: memory comes first again
                    room = self.max_spilled - self.spilled
                    part, pending = pending[:room], pending[room:]
                    await asyncio.to_thread(self._spill.append, part)
                    if not self.spilled:
                        log.warning("kafka_spilling path=%s", self._spill.path)
                    self.spilled += len(part)
                continue
            # Both bounds full: wait for the resender to make room (the feeds wait with us).
            self._wake.set()
            self._room.clear()
            await self._room.wait()
        self._wake.set()

    async def run(self) -> None:
        """The resender: oldest first, memory then file, retrying every ``retry_s``."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.backlog:
                if not await self._resend_once():
                    await asyncio.sleep(self._retry_s)
            self._idle.set()

    async def _resend_once(self) -> bool:
        """Send the oldest chunk; False when some of it failed (it keeps its place)."""
        suspect = self._suspect and self._reconcile is not None and self.held
        if suspect and not await self._drop_written():
            return False
        if not self.held:
            await self._load_spilled()
        chunk = [self.held[i] for i in range(min(self._chunk, len(self.held)))]
        failed = await self._send(chunk)
        failed_ids = {id(r) for r in failed}
        for _ in range(len(chunk)):
            self.held.popleft()
        self.held.extendleft(r for r in reversed(chunk) if id(r) in failed_ids)
        self._room.set()
        if not self.backlog:
            self._idle.set()
        return not failed

    async def _drop_written(self) -> bool:
        """Take the held records the topic already has out of the backlog (acknowledged after
        all); False while the broker cannot say. Only memory is checked: a record is spilled
        only after the memory bound, behind the ones whose send failed first."""
        assert self._reconcile is not None
        held = list(self.held)
        try:
            found = await self._reconcile(held)
        except Exception as exc:  # noqa: BLE001 - the broker still away: try again later
            log.info("kafka_reconcile_deferred error=%r", exc)
            return False
        self._suspect = False
        if not found:
            return True
        keep = [r for r in held if r.rid not in found]
        written = [r for r in held if r.rid in found]
        self.held.clear()
        self.held.extend(keep)
        self.reconciled += len(written)
        self.published += len(written)
        if self._on_acked is not None:
            self._on_acked(written, [found[r.rid] for r in written])
        log.warning("kafka_reconciled already_written=%d not_sent_again", len(written))
        self._room.set()
        if not self.backlog:
            self._idle.set()
        return True

    async def _load_spilled(self) -> None:
        async with self._file_lock:
            records, self._read_at = await asyncio.to_thread(
                self._spill.read, self._read_at, self._chunk
            )
            # In memory before the count drops: the backlog is never seen empty meanwhile.
            self.held.extend(records)
            self.spilled -= len(records)
            if not records or self.spilled <= 0:
                self.spilled = 0
                self._read_at = 0
                await asyncio.to_thread(self._spill.remove)

    async def close(self, timeout_s: float) -> None:
        """Try to publish the backlog for ``timeout_s`` (the resender has stopped), then keep
        what is left on disk: the next start publishes it first."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.backlog and await self._resend_once():
                    pass
        except TimeoutError:
            pass
        if self.held:
            async with self._file_lock:
                await asyncio.to_thread(self._spill.rewrite, list(self.held), self._read_at)
            log.warning("kafka_unpublished_kept path=%s records=%d", self._spill.path, self.backlog)
            self.held.clear()
