"""A FIX 4.4 market-data venue as an ingest source: we connect as the initiator.

The producer owns the connection: it reads 64 KiB chunks, frames them with a fresh FixFramer
per connection, lets the FixSession account for every message (sequence numbers, gap recovery,
heartbeats) and puts the market-data frames the session applied in each read on the source
queue as one FixItem, with the session's mark (the next expected inbound MsgSeqNum). Frames the
session applied are always put, also when a later message of the same read ends the session,
when the read loop is cancelled while blocked on a full queue, and during the logout wait.
Sequence numbers carry over from one connection to the next and, through the sequence store,
across restarts. Reconnects never give up (marketflow.backoff), every attempt logged. The
parser (see fix_market_data.py) runs in the worker pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from pathlib import Path

from marketflow.adapters.feeds.fix_market_data import FixItem, FixMarketDataParser
from marketflow.adapters.fix.codec import FixFramer, FrameReject
from marketflow.adapters.fix.seq_store import SequenceStore
from marketflow.adapters.fix.session import FixSession, FixSessionError, LinkDead, SessionConfig
from marketflow.backoff import Backoff, reconnect_forever
from marketflow.domain.feeds import Clock, FeedStatus, Source
from marketflow.settings import ExchangeSettings, PipelineSettings

__all__ = ["FixFeedProducer", "FixItem", "FixMarketDataParser", "build_fix_source"]

log = logging.getLogger("marketflow.feeds.fix")

FixQueue = asyncio.Queue[tuple[FixItem, int]]
_PERSIST_EVERY_S = 1.0  # how often the expected inbound number is written to the store


def _no_mark() -> int | None:
    return None


@dataclass(eq=False)
class FixFeedProducer:
    """Connects to a FIX venue, runs the session and feeds market-data frames to the queue."""

    name: str
    host: str
    port: int
    session_config: SessionConfig
    pipeline: PipelineSettings
    clock: Clock
    _: KW_ONLY
    monotonic: Callable[[], float] = time.monotonic
    rng: InitVar[random.Random | None] = None
    connect_timeout_s: float = 5.0
    logout_wait_s: float = 1.0
    store: SequenceStore | None = None
    resume_mark: Callable[[], int | None] = _no_mark
    backoff: Backoff = field(init=False)
    session: FixSession | None = field(init=False, default=None)  # the current one
    _seqs: tuple[int, int] | None = field(init=False, default=None)  # (next out, next in)
    _pending: tuple[FixItem, int] | None = field(init=False, default=None)  # put when cancelled

    def __post_init__(self, rng: random.Random | None) -> None:
        p = self.pipeline
        self.backoff = Backoff(p.reconnect_initial_s, p.reconnect_max_s, rng or random.Random())

    def starting_seqs(self) -> tuple[int, int]:
        """(next out, next expected in) for the next connection. At the first connection of
        this producer: the core's durable mark, else the store's numbers, else 1; later, what
        the previous session ended with (nothing in-process is lost)."""
        if self._seqs is None:
            saved = self.store.load() if self.store is not None else None
            try:
                mark = self.resume_mark()
            except Exception:  # the core's store may be down: the sequence file still serves
                log.exception("fix_resume_mark_failed source=%s", self.name)
                mark = None
            next_in = mark if mark is not None and mark >= 1 else (saved.next_in if saved else 1)
            next_out = saved.next_out if saved else 1
            log.info(
                "fix_resume source=%s next_out=%d next_in=%d from=%s",
                self.name, next_out, next_in,
                "mark" if mark is not None else "store" if saved else "start",
            )  # fmt: skip
            self._seqs = (next_out, next_in)
        return self._seqs

    async def run(self, out: FixQueue, status: FeedStatus) -> None:
        """Connect, run sessions and reconnect until cancelled."""
        status.address = f"{self.host}:{self.port}"

        async def connect() -> None:
            status.connecting()
            log.info(
                "fix_connect source=%s address=%s attempt=%d",
                self.name, status.address, status.connect_attempts,
            )  # fmt: skip
            try:
                await self._connection(out, status)
            finally:
                status.connected = False

        def ended(exc: Exception | None, delay: float) -> None:
            if exc is None:
                error = "connection closed by the venue"
            elif isinstance(exc, OSError | EOFError | TimeoutError | FixSessionError):
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                status.stale = status.stale or isinstance(exc, LinkDead)
            else:  # a feed bug must not end the daemon: logged with its traceback, retried
                log.error("fix_connection_failed source=%s", self.name, exc_info=exc)
                error = f"{type(exc).__name__}: {exc}"
            status.last_error = error
            log.warning(
                "fix_disconnected source=%s error=%s retry_in_s=%.2f failures=%d",
                self.name, error, delay, self.backoff.failures,
            )  # fmt: skip

        await reconnect_forever(connect, self.backoff, ended)

    async def _connection(self, out: FixQueue, status: FeedStatus) -> None:
        """One TCP connection and FIX session; returns on EOF, raises on failures. A session
        that logged on resets the backoff, however it ended."""
        next_out, next_in = self.starting_seqs()
        async with asyncio.timeout(self.connect_timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        framer = FixFramer(self.pipeline.max_line_bytes)  # a fresh buffer per connection
        session = FixSession(
            self.session_config,
            writer,
            monotonic=self.monotonic,
            wall_ms=self.clock,
            rejects=status.rejects,
            next_out=next_out,
            next_in=next_in,
            persist=self.store.save if self.store is not None else None,
        )
        self.session = session
        try:
            session.start()
            status.connected = True
            await self._read_loop(reader, writer, framer, session, out, status)
        except asyncio.CancelledError:
            await self._shutdown(reader, framer, session, out, status)
            raise
        finally:
            self._seqs = (session.next_out_seq, session.expected_in_seq)
            if session.md_req_id is not None:
                self.backoff.reset()
            session.persist()
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _read_loop(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        framer: FixFramer,
        session: FixSession,
        out: FixQueue,
        status: FeedStatus,
    ) -> None:
        chunk = self.pipeline.read_chunk_bytes
        persisted = self.monotonic()
        while True:
            try:
                wait = session.poll()  # heartbeats, test requests, resend timeout; LinkDead
            finally:
                await self._flush(session, out, self.clock())  # an abandoned gap drains
            await writer.drain()  # surfaces a broken pipe; session messages are tiny
            try:
                async with asyncio.timeout(wait):
                    data = await reader.read(chunk)
            except TimeoutError:
                continue
            if not data:
                return
            received_ms = self.clock()
            status.bytes_in += len(data)
            status.chunks += 1
            status.stale = False
            try:
                self._feed(framer, session, data, status)
            finally:  # what the session applied before a Logout or too-low MsgSeqNum counts
                await self._flush(session, out, received_ms)
            if session.closed:
                return
            now = self.monotonic()
            if now - persisted >= _PERSIST_EVERY_S:
                session.persist()
                persisted = now

    def _feed(self, framer: FixFramer, session: FixSession, data: bytes, st: FeedStatus) -> None:
        for frame in framer.feed(data):
            if type(frame) is bytes:
                session.on_frame(frame)
            else:
                assert isinstance(frame, FrameReject)
                self._reject(frame, st)

    async def _flush(self, session: FixSession, out: FixQueue, received_ms: int) -> None:
        """Put what the session applied, with its mark, on the queue (blocks when full: TCP
        pushes back). Cancelled while blocked, the item stays pending for ``_shutdown``."""
        frames = session.take_market_data()
        if not frames:
            return
        self._pending = (FixItem(frames, session.expected_in_seq), received_ms)
        await out.put(self._pending)
        self._pending = None

    def _reject(self, reject: FrameReject, status: FeedStatus) -> None:
        status.rejects.add(reject.reason, reject.raw)  # FeedStatus logs a sample

    async def _shutdown(
        self,
        reader: asyncio.StreamReader,
        framer: FixFramer,
        session: FixSession,
        out: FixQueue,
        status: FeedStatus,
    ) -> None:
        """Cancelled: put the pending item, send Logout and wait briefly for the venue's,
        keeping the market data read meanwhile. Puts are bounded too (the workers may be
        gone); what cannot be put is counted (``dropped_at_shutdown``), never silent."""
        pending, self._pending = self._pending, None
        deadline = asyncio.get_running_loop().time() + self.logout_wait_s
        with contextlib.suppress(OSError, TimeoutError, FixSessionError):
            async with asyncio.timeout_at(deadline):
                if pending is not None:
                    await out.put(pending)
                    pending = None
                session.logout("shutdown")
                while not session.closed:
                    data = await reader.read(self.pipeline.read_chunk_bytes)
                    if not data:
                        break
                    self._feed(framer, session, data, status)
        frames = session.take_market_data()
        items = [] if pending is None else [pending]
        if frames:
            items.append((FixItem(frames, session.expected_in_seq), self.clock()))
        for n, item in enumerate(items):
            try:
                async with asyncio.timeout(self.logout_wait_s):
                    await out.put(item)
            except TimeoutError:
                lost = sum(len(i[0].frames) for i in items[n:])
                status.rejects.add("dropped_at_shutdown", b"%d frames" % lost, lost)
                log.error("fix_dropped_at_shutdown source=%s frames=%d", self.name, lost)  # noqa: TRY400 - no traceback to show
                return


def build_fix_source(
    settings: ExchangeSettings,
    pairs: Sequence[str],
    pipeline: PipelineSettings,
    clock: Clock,
    *,
    data_dir: Path = Path("var"),
    resume_mark: Callable[[], int | None] = _no_mark,
) -> Source[FixItem]:
    """The ingest source of one ``protocol = "fix"`` exchange (we are the FIX initiator).

    Liveness: a TestRequest after half of ``stale_after_s`` (or 1.2 x HeartBtInt) of silence,
    and the link is declared dead, shown stale and reconnected after ``stale_after_s`` (or
    2 x HeartBtInt), whichever is sooner. Sequence numbers live in
    ``<data_dir>/fix/<name>.seq``; ``resume_mark`` returns the core's durable mark of this
    source (the next inbound MsgSeqNum not yet durable), which wins over the store at start.
    """
    status = FeedStatus(settings.name, "fix", f"{settings.host}:{settings.port}")
    hb = settings.heartbeat_s
    target = settings.target_comp_id or settings.name.upper()
    session = SessionConfig(
        sender=settings.sender_comp_id,
        target=target,
        symbols=tuple(pairs),
        heartbeat_s=hb,
        test_request_after_s=min(hb * 1.2, pipeline.stale_after_s / 2),
        dead_after_s=min(hb * 2.0, pipeline.stale_after_s),
        reset_on_logon=settings.reset_on_logon,
        resend_chunk_size=settings.resend_chunk_size,
        resend_timeout_s=settings.resend_timeout_s,
        market_depth=settings.market_depth,
    )
    store = SequenceStore.for_venue(data_dir, settings.name, settings.sender_comp_id, target)
    producer = FixFeedProducer(
        settings.name,
        settings.host,
        settings.port,
        session,
        pipeline,
        clock,
        store=store,
        resume_mark=resume_mark,
    )
    parser = FixMarketDataParser(settings.name, pairs, status.rejects, depth=settings.market_depth)
    return Source(status, producer, parser)
