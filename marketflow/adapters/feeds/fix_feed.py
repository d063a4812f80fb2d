"""A FIX 4.4 market-data venue as an ingest source: we connect as the initiator.

The producer owns the connection: it reads 64 KiB chunks, frames them with a fresh FixFramer
per connection, lets the FixSession account for every message (sequence numbers, heartbeats)
and puts the market-data frames of each read on the source queue as one item. Reconnects never
give up: exponential backoff with jitter, capped, every attempt logged. The parser (see
fix_market_data.py) runs in the worker pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence

from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.fix.codec import FixFramer, FrameReject
from marketflow.adapters.fix.session import FixSession, FixSessionError, LinkDead, SessionConfig
from marketflow.app.feed_status import FeedStatus
from marketflow.app.ingest import Clock, Source
from marketflow.settings import ExchangeSettings, PipelineSettings

__all__ = ["FixFeedProducer", "FixItem", "FixMarketDataParser", "build_fix_source"]

log = logging.getLogger("marketflow.feeds.fix")

FixItem = list[bytes]
"""The market-data frames (35=W/35=X) of one read, in stream order."""


class FixFeedProducer:
    """Connects to a FIX venue, runs the session and feeds market-data frames to the queue."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        session: SessionConfig,
        pipeline: PipelineSettings,
        clock: Clock,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        connect_timeout_s: float = 5.0,
        logout_wait_s: float = 1.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.session_config = session
        self._pipeline = pipeline
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._connect_timeout_s = connect_timeout_s
        self._logout_wait_s = logout_wait_s
        self.session: FixSession | None = None  # the current one, for stats and tests

    async def run(self, out: asyncio.Queue[tuple[FixItem, int]], status: FeedStatus) -> None:
        """Connect, run sessions and reconnect until cancelled."""
        status.address = f"{self.host}:{self.port}"
        failures = 0
        while True:
            status.connect_attempts += 1
            log.info(
                "fix_connect source=%s address=%s attempt=%d",
                self.name,
                status.address,
                status.connect_attempts,
            )
            logged_on = False
            previous = self.session
            try:
                logged_on = await self._connection(out, status)
                error = "connection closed by the venue"
            except asyncio.CancelledError:
                status.connected = False
                raise
            except (OSError, EOFError, TimeoutError, FixSessionError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                status.stale = status.stale or isinstance(exc, LinkDead)
            except Exception as exc:  # a feed bug must not end the daemon: log it and retry
                log.exception("fix_connection_failed source=%s", self.name)
                error = f"{type(exc).__name__}: {exc}"
            session = self.session
            if session is not None and session is not previous:
                logged_on = logged_on or session.md_req_id is not None
            status.connected = False
            status.last_error = error
            failures = 1 if logged_on else failures + 1  # a session that worked resets backoff
            delay = self._backoff(failures)
            log.warning(
                "fix_disconnected source=%s error=%s retry_in_s=%.2f failures=%d",
                self.name,
                error,
                delay,
                failures,
            )
            await asyncio.sleep(delay)
            status.reconnects += 1

    def _backoff(self, failures: int) -> float:
        """Exponential in consecutive failures, capped, with jitter so venues are not stormed."""
        p = self._pipeline
        base = min(p.reconnect_max_s, p.reconnect_initial_s * 2.0 ** min(failures - 1, 30))
        return base * self._rng.uniform(0.5, 1.0)

    async def _connection(
        self, out: asyncio.Queue[tuple[FixItem, int]], status: FeedStatus
    ) -> bool:
        """One TCP connection and FIX session; returns on EOF, raises on failures."""
        async with asyncio.timeout(self._connect_timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        framer = FixFramer(self._pipeline.max_line_bytes)  # a fresh buffer per connection
        session = FixSession(
            self.session_config,
            writer,
            monotonic=self._monotonic,
            wall_ms=self._clock,
            rejects=status.rejects,
        )
        self.session = session
        try:
            session.start()
            status.connected = True
            await self._read_loop(reader, writer, framer, session, out, status)
        except asyncio.CancelledError:
            await self._logout(reader, framer, session)
            raise
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
        return session.md_req_id is not None

    async def _read_loop(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        framer: FixFramer,
        session: FixSession,
        out: asyncio.Queue[tuple[FixItem, int]],
        status: FeedStatus,
    ) -> None:
        chunk = self._pipeline.read_chunk_bytes
        while True:
            wait = session.poll()  # heartbeats, test requests; raises LinkDead
            await writer.drain()  # surfaces a broken pipe; session messages are tiny
            try:
                async with asyncio.timeout(wait):
                    data = await reader.read(chunk)
            except TimeoutError:
                continue
            if not data:
                return
            received_ms = self._clock()
            status.bytes_in += len(data)
            status.chunks += 1
            status.stale = False
            item: FixItem = []
            for frame in framer.feed(data):
                if type(frame) is bytes:
                    if session.on_frame(frame):
                        item.append(frame)
                else:
                    assert isinstance(frame, FrameReject)
                    self._reject(frame, status)
            if session.closed:
                return
            if item:
                await out.put((item, received_ms))  # blocks when full: TCP pushes back

    def _reject(self, reject: FrameReject, status: FeedStatus) -> None:
        status.rejects.add(reject.reason, reject.raw)
        n = status.rejects.counts[reject.reason]
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th ...: a sample, never a flood
            log.warning(
                "fix_frame_rejected source=%s reason=%s count=%d sample=%r",
                self.name,
                reject.reason,
                n,
                reject.raw[:200],
            )

    async def _logout(
        self, reader: asyncio.StreamReader, framer: FixFramer, session: FixSession
    ) -> None:
        """Send Logout and wait briefly for the venue's; market data read meanwhile is dropped."""
        session.logout("shutdown")
        with contextlib.suppress(OSError, TimeoutError, FixSessionError):
            async with asyncio.timeout(self._logout_wait_s):
                while not session.closed:
                    data = await reader.read(self._pipeline.read_chunk_bytes)
                    if not data:
                        return
                    for frame in framer.feed(data):
                        if type(frame) is bytes:
                            session.on_frame(frame)


def build_fix_source(
    settings: ExchangeSettings,
    pairs: Sequence[str],
    pipeline: PipelineSettings,
    clock: Clock,
) -> Source[FixItem]:
    """The ingest source of one ``protocol = "fix"`` exchange (we are the FIX initiator).

    Liveness: a TestRequest after half of ``stale_after_s`` (or 1.2 x HeartBtInt) of silence,
    and the link is declared dead, shown stale and reconnected after ``stale_after_s`` (or
    2 x HeartBtInt), whichever is sooner.
    """
    status = FeedStatus(settings.name, "fix", f"{settings.host}:{settings.port}")
    hb = settings.heartbeat_s
    session = SessionConfig(
        sender=settings.sender_comp_id,
        target=settings.target_comp_id or settings.name.upper(),
        symbols=tuple(pairs),
        heartbeat_s=hb,
        test_request_after_s=min(hb * 1.2, pipeline.stale_after_s / 2),
        dead_after_s=min(hb * 2.0, pipeline.stale_after_s),
    )
    producer = FixFeedProducer(
        settings.name, settings.host, settings.port, session, pipeline, clock
    )
    parser = FixMarketDataParser(settings.name, pairs, status.rejects)
    return Source(status, producer, parser)
