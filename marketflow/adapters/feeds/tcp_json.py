"""A live exchange feed: newline-delimited JSON over TCP (docs/protocols.md, JSON ticks).

The producer reads 64 KiB chunks, never a line at a time, and puts only complete lines on the
source queue (the parser turns a whole chunk into one batch). It owns the connection's life:
connect with a timeout, mark the feed stale and reconnect when it goes silent, reconnect
forever (marketflow.backoff). ``await queue.put`` blocks while the
source queue is full, so the socket is not read and TCP flow control pushes back on the
exchange: nothing is dropped and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.backoff import Backoff, reconnect_forever
from marketflow.domain.feeds import Clock, FeedStatus, Source
from marketflow.settings import ExchangeSettings, PipelineSettings

log = logging.getLogger("marketflow.feeds.json")

AUTO_GROWTH_PAIRS = 100  # from this many pairs on, reads grow while behind ...
AUTO_GROWTH_FACTOR = 8  # ... to this many times read_chunk_bytes (see max_read_bytes)


class _Stale(Exception):
    """The connection was silent for ``stale_after_s``."""


class SilenceWatchdog:
    """Fails a read that has waited ``silent_s`` for data with ``_Stale``, like an
    ``asyncio.timeout`` around each read, but without a timer per read: one timer re-armed
    every ``silent_s`` at most, and two stores per read (a read per 1 ms chunk at 100,000
    ticks/s paid ~5% of the daemon's CPU for its timeout). Time spent outside a read (waiting
    for room in the source queue) is not silence."""

    def __init__(self, reader: asyncio.StreamReader, silent_s: float) -> None:
        self._reader = reader
        self._silent_s = silent_s
        self._loop = asyncio.get_running_loop()
        self._since = self._loop.time()
        self._waiting = False
        self._handle = self._loop.call_at(self._since + silent_s, self._check)

    def reading(self) -> None:
        """Right before awaiting a read (no await in between)."""
        self._since = self._loop.time()
        self._waiting = True

    def idle(self) -> None:
        """The read returned."""
        self._waiting = False

    def _check(self) -> None:
        now = self._loop.time()
        due = self._since + self._silent_s
        if self._waiting and now >= due:
            # The task is suspended in that read: it wakes with the exception.
            self._reader.set_exception(_Stale())
            return
        self._handle = self._loop.call_at(
            due if self._waiting else now + self._silent_s, self._check
        )

    def close(self) -> None:
        self._handle.cancel()


@dataclass(eq=False)
class TcpJsonProducer:
    """Connects to one exchange and feeds chunks of complete lines to the source queue."""

    host: str
    port: int
    pipeline: PipelineSettings
    clock: Clock
    _: KW_ONLY
    pairs: int = 0  # the feed's configured pairs: how far reads grow when behind
    connect_timeout_s: float = 5.0
    rng: InitVar[random.Random | None] = None
    backoff: Backoff = field(init=False)

    def __post_init__(self, rng: random.Random | None) -> None:
        p = self.pipeline
        self.backoff = Backoff(p.reconnect_initial_s, p.reconnect_max_s, rng or random.Random())

    async def run(self, out: asyncio.Queue[tuple[bytes, int]], status: FeedStatus) -> None:
        """Connect, read and reconnect until cancelled."""
        status.address = f"{self.host}:{self.port}"

        async def connect() -> None:
            status.connecting()
            try:
                if await self._connection(out, status):
                    self.backoff.reset()  # it delivered data: a restarted exchange is back fast
            finally:
                status.connected = False

        def ended(exc: Exception | None, delay: float) -> None:
            if exc is None:
                error = "connection closed by the exchange"
            elif isinstance(exc, _Stale):
                status.stale = True
                error = f"no data for {self.pipeline.stale_after_s:g}s"
            elif isinstance(exc, OSError | TimeoutError):
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:  # a feed bug: logged with its traceback, retried like an outage
                log.error("feed_failed exchange=%s", status.name, exc_info=exc)
                error = f"{type(exc).__name__}: {exc}"
            status.last_error = error
            log.warning(
                "feed_connect_failed exchange=%s attempt=%d retry_in_s=%.2f error=%s",
                status.name,
                status.connect_attempts,
                delay,
                error,
            )

        await reconnect_forever(connect, self.backoff, ended)

    def max_read_bytes(self) -> int:
        """How far reads grow while they come back full (``read_chunk_max_bytes``; 0: by
        the pairs, since a 64 KiB chunk of hundreds of pairs holds a few ticks per pair and
        second, and the parser's fold saves little on it)."""
        p = self.pipeline
        if p.read_chunk_max_bytes:
            return max(p.read_chunk_bytes, p.read_chunk_max_bytes)
        return p.read_chunk_bytes * (AUTO_GROWTH_FACTOR if self.pairs >= AUTO_GROWTH_PAIRS else 1)

    async def _connection(self, out: asyncio.Queue[tuple[bytes, int]], status: FeedStatus) -> bool:
        """One connection until EOF; True when it delivered any data. Raises on failures."""
        async with asyncio.timeout(self.connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, limit=self.max_read_bytes()
            )
        status.connected = True
        log.info("feed_connected exchange=%s address=%s", status.name, status.address)
        try:
            return await self._pump(reader, out, status)
        finally:
            writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        out: asyncio.Queue[tuple[bytes, int]],
        status: FeedStatus,
    ) -> bool:
        p = self.pipeline
        base = chunk_bytes = p.read_chunk_bytes
        most = self.max_read_bytes()
        max_line = p.max_line_bytes
        stale_s = p.stale_after_s
        rejects = status.rejects
        clock = self.clock
        rest = b""  # a fresh buffer per connection: never glue lines across connections
        skipping = False  # inside an over-long line: drop bytes up to its newline
        got_data = False
        watchdog = SilenceWatchdog(reader, stale_s)
        try:
            while True:
                watchdog.reading()
                try:
                    data = await reader.read(chunk_bytes)
                except _Stale:
                    log.warning("feed_stale exchange=%s silent_s=%g", status.name, stale_s)
                    self._drop_partial(rest, status)
                    raise
                watchdog.idle()
                if not data:
                    self._drop_partial(rest, status)
                    return got_data
                # Behind (the read filled): twice as much next time, up to ``most``.
                chunk_bytes = min(2 * chunk_bytes, most) if len(data) >= chunk_bytes else base
                if not got_data:
                    got_data = True
                    status.stale = False
                status.chunks += 1
                status.bytes_in += len(data)
                if skipping:
                    nl = data.find(b"\n")
                    if nl < 0:
                        continue
                    data = data[nl + 1 :]
                    skipping = False
                buf = rest + data if rest else data
                last = buf.rfind(b"\n")
                if last < 0:
                    rest = buf
                else:
                    rest = buf[last + 1 :]
                    # Blocks while the queue is full: the socket is not read meanwhile.
                    await out.put((buf[: last + 1], clock()))
                if len(rest) > max_line:
                    rejects.add("line_too_long", rest)
                    rest = b""
                    skipping = True
        finally:
            watchdog.close()

    @staticmethod
    def _drop_partial(rest: bytes, status: FeedStatus) -> None:
        """The connection ended inside a line: those bytes are bad input, count them."""
        if rest:
            status.rejects.add("truncated_line", rest)
            log.warning(
                "feed_truncated_line exchange=%s bytes=%d sample=%r",
                status.name,
                len(rest),
                rest[:200],
            )


def build_json_source(
    settings: ExchangeSettings,
    pairs: Sequence[str],
    pipeline: PipelineSettings,
    clock: Clock,
) -> Source[bytes]:
    """A live JSON exchange (``type = "tcp"``, ``protocol = "json"``) with its parser."""
    status = FeedStatus(
        name=settings.name, protocol="json", address=f"{settings.host}:{settings.port}"
    )
    parser = JsonLinesParser(
        settings.name, frozenset(pairs), status.rejects, max_price=pipeline.max_price
    )
    producer = TcpJsonProducer(settings.host, settings.port, pipeline, clock, pairs=len(pairs))
    return Source(status=status, producer=producer, parser=parser)
