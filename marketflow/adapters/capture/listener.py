"""TCP listener of the FIX capture audit trail (docs/protocols.md, FIX capture).

Clients up to ``max_connections``, no session handshake. Each connection has its own
FixFramer, reads chunks of up to 16 KiB (about a hundred messages: with many busy clients, a
smaller chunk per connection and loop round keeps the loop responsive to the store writer,
which stores more per second than with 64 KiB chunks) and hands the frames of each
read to the capture use case with the receipt time and the peer address. ``submit`` blocks
while storage is behind, so a connection then stops reading and TCP flow control slows its
sender. The listener never buffers without bound: per connection, the stream reader's buffer
(two reads) plus the framer's (at most one ``max_message_bytes`` message plus one read).
A peer that sends garbage gets its bytes recorded as rejects; nothing it sends can end the
listener or another connection. Bytes left incomplete when a peer disconnects (or is closed
after ``idle_timeout_s`` of silence) are recorded as a ``truncated_at_disconnect`` reject.
What is refused is counted in ``stats()``: connections above the cap, idle peers closed,
messages above the size limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from marketflow.adapters.fix.codec import FixFramer, FrameReject
from marketflow.settings import CaptureSettings

log = logging.getLogger("marketflow.capture.listener")


class FrameSink(Protocol):
    """Where framed messages go (app.capture.CaptureService)."""

    async def submit(
        self,
        peer: str,
        received_ms: int,
        frames: Sequence[bytes],
        rejects: Sequence[tuple[str, bytes]] = (),
    ) -> None: ...


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class CaptureListener:
    """``async with CaptureListener(service, settings):`` accepts clients until closed."""

    def __init__(
        self,
        sink: FrameSink,
        settings: CaptureSettings,
        *,
        clock: Callable[[], int] = _wall_ms,
        read_bytes: int = 16384,
    ) -> None:
        self._sink = sink
        self._host = settings.host
        self._port = settings.port
        self._max_message = settings.max_message_bytes
        self._max_connections = settings.max_connections
        self._idle_timeout_s = settings.idle_timeout_s
        self._clock = clock
        self._read_bytes = read_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False
        self.connections_total = 0
        self.connections_refused = 0
        self.idle_closed = 0
        self.messages_too_large = 0
        self.bytes_received = 0

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when configured with 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and accept (idempotent); raises OSError when the address is taken."""
        if self._server is None and not self._closed:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=self._read_bytes
            )
            log.info("capture_listening host=%s port=%d", self._host, self.port)

    async def __aenter__(self) -> CaptureListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def stats(self) -> dict[str, int]:
        """Connection counters for /health and metrics."""
        return {
            "connections_open": len(self._connections),
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "idle_closed": self.idle_closed,
            "messages_too_large": self.messages_too_large,
            "bytes_received": self.bytes_received,
        }

    async def aclose(self) -> None:
        """Stop accepting, end every connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        if len(self._connections) >= self._max_connections:
            self.connections_refused += 1
            if self.connections_refused & (self.connections_refused - 1) == 0:  # 1, 2, 4 ...
                log.warning(
                    "capture_connection_refused peer=%s open=%d refused_total=%d",
                    peer,
                    len(self._connections),
                    self.connections_refused,
                )
            writer.close()
            return
        self._connections.add(task)
        self.connections_total += 1
        log.info("capture_connected peer=%s", peer)
        try:
            await self._read(reader, peer)
        except (ConnectionError, OSError) as exc:
            log.info("capture_connection_lost peer=%s error=%s", peer, exc)
        except Exception:
            # One connection's bug must not end the listener: log it and drop the connection.
            log.exception("capture_connection_failed peer=%s", peer)
        finally:
            self._connections.discard(task)
            writer.close()
        log.info("capture_disconnected peer=%s", peer)

    async def _read(self, reader: asyncio.StreamReader, peer: str) -> None:
        framer = FixFramer(self._max_message)
        submit = self._sink.submit
        idle_s = self._idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    data = await reader.read(self._read_bytes)
            except TimeoutError:
                self.idle_closed += 1
                log.info("capture_idle_closed peer=%s silent_s=%g", peer, idle_s)
                break
            if not data:
                break
            received_ms = self._clock()
            self.bytes_received += len(data)
            items = framer.feed(data)
            if not items:
                continue
            frames: Sequence[bytes] = items  # type: ignore[assignment]  # bytes, checked next
            rejects: list[tuple[str, bytes]] = []
            if not all(type(item) is bytes for item in items):
                frames = [item for item in items if type(item) is bytes]
                rejects = [(r.reason, r.raw) for r in items if isinstance(r, FrameReject)]
                self.messages_too_large += sum(r[0] == "message_too_large" for r in rejects)
            await submit(peer, received_ms, frames, rejects)
            # One read per connection per loop round: with many busy peers, none keeps the loop
            # (and the store writer waiting on its database reply) for more than one chunk.
            await asyncio.sleep(0)
        if framer.buffered:
            await submit(peer, self._clock(), (), [("truncated_at_disconnect", framer.pending())])
