"""The FIX market-data server: an acceptor port where downstream FIX 4.4 initiators log on,
subscribe (35=V) and receive the world view as 35=W snapshots then 35=X incrementals.

This module is the I/O around the sans-IO acceptor session (adapters/fix/acceptor.py, built
by bootstrap and handed in as ``new_session``) and the subscriptions (app/fix_distribution.py):
one reader task per connection, and one cadence task that flushes the coalesced updates, runs
every session's timers and writes what each session has to say. No publisher ever awaits a
consumer: output is written to the transport's buffer, and a consumer whose buffer grows past
``max_buffer_bytes`` is disconnected. Sessions are capped (``max_sessions``) and one per
CompID. On stop every session gets a Logout and a moment to answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from marketflow.app.fix_distribution import Distribution
from marketflow.domain.md_levels import Level, LevelChange, MdRequest
from marketflow.settings import FixServerSettings

log = logging.getLogger("marketflow.fix_server")


class ServerSession(Protocol):
    """The acceptor session as the server drives it (adapters/fix/acceptor.AcceptorSession)."""

    peer: str | None
    close_reason: str
    refused: str | None  # why the Logon was refused (a bounded kind), None once logged on
    messages_sent: int
    garbled: int
    on_request: Callable[[MdRequest], None]
    on_logon: Callable[[], None]
    on_gap_filled: Callable[[], None]

    @property
    def closed(self) -> bool: ...

    @property
    def logged_on(self) -> bool: ...

    def feed(self, data: bytes) -> None: ...

    def poll(self) -> None: ...

    def take_output(self) -> bytes: ...

    def logout(self, text: str) -> None: ...

    def disconnected(self) -> None: ...

    def snapshot(self, req_id: str, symbol: str, bids: Sequence[Level],
                 offers: Sequence[Level]) -> None: ...  # fmt: skip

    def incremental(self, req_id: str, symbol: str, changes: Sequence[LevelChange]) -> None: ...

    def request_reject(self, req_id: str, reason: int, text: str) -> None: ...


Refusal = tuple[str, str]  # (kind, Logout text)
SessionFactory = Callable[[Callable[[str], Refusal | None]], ServerSession]
"""Builds a session for a new connection, given the server's ``admit(peer) -> refusal``."""

REFUSED_DUPLICATE = "duplicate"  # the acceptor's kinds (adapters/fix/acceptor.py REFUSALS)
REFUSED_SESSION_CAP = "session_cap"


class _Conn:
    __slots__ = ("logged_on", "session", "writer")

    def __init__(self, session: ServerSession, writer: asyncio.StreamWriter) -> None:
        self.session = session
        self.writer = writer
        self.logged_on = False


class FixServer:
    """``await start()``, ``await aclose()``; ``port`` is the bound port."""

    def __init__(
        self, settings: FixServerSettings, distribution: Distribution, new_session: SessionFactory
    ) -> None:
        self.settings = settings
        self.distribution = distribution
        self._new_session = new_session
        self.port = settings.port
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._active: dict[str, _Conn] = {}  # logged-on sessions by the peer's CompID
        self._handlers: set[asyncio.Task[None]] = set()
        self._cadence: asyncio.Task[None] | None = None
        self.logons = 0
        self.refused: dict[str, int] = {}  # refused logons by kind (bounded)
        self.slow_closed = 0
        self._sent_closed = 0  # messages sent by sessions that have ended
        self._garbled_closed = 0

    def stats(self) -> dict[str, object]:
        """For /health and /metrics: totals since start, sessions now."""
        live = [c.session for c in self._conns]
        return {
            "port": self.port,
            "sessions": len(self._active),
            "connections": len(self._conns),
            "logons": self.logons,
            "refused": dict(sorted(self.refused.items())),
            "slow_closed": self.slow_closed,
            "messages_sent": self._sent_closed + sum(s.messages_sent for s in live),
            "garbled": self._garbled_closed + sum(s.garbled for s in live),
            "snapshots_sent": self.distribution.snapshots_sent,
            "incrementals_sent": self.distribution.incrementals_sent,
            "request_rejects": self.distribution.rejects_sent,
        }

    async def start(self) -> None:
        s = self.settings
        self._server = await asyncio.start_server(self._accept, s.host, s.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._cadence = asyncio.create_task(self._run_cadence(), name="fix-server-cadence")
        log.info("fix_server_listening host=%s port=%d comp_id=%s", s.host, self.port, s.comp_id)

    async def aclose(self) -> None:
        """Logout to every session, a moment for the answers, then close everything."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn.session.logout("daemon stopping")
            self._write(conn)
        if self._handlers:  # a reader ends when its session closes (the Logout answered)
            await asyncio.wait(list(self._handlers), timeout=self.settings.logout_timeout_s)
        if self._cadence is not None:
            self._cadence.cancel()
            await asyncio.gather(self._cadence, return_exceptions=True)
        for conn in list(self._conns):
            conn.writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        for task in list(self._handlers):
            task.cancel()
        await self._server.wait_closed()
        self._server = None

    def _admit(self, peer: str) -> Refusal | None:
        if peer in self._active:
            return REFUSED_DUPLICATE, f"a session for {peer} is already logged on"
        if len(self._active) >= self.settings.max_sessions:
            return REFUSED_SESSION_CAP, f"too many sessions (max {self.settings.max_sessions})"
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        session = self._new_session(self._admit)
        conn = _Conn(session, writer)
        self._conns.add(conn)
        session.on_request = lambda req: self.distribution.request(session, req)
        session.on_logon = lambda: self._logged_on(conn)
        session.on_gap_filled = lambda: self.distribution.refresh(session)
        try:
            while not session.closed:
                data = await reader.read(65536)
                if not data:
                    break
                session.feed(data)
                self._write(conn)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._gone(conn)
            self._handlers.discard(task)

    def _logged_on(self, conn: _Conn) -> None:
        peer = conn.session.peer
        assert peer is not None
        self._active[peer] = conn
        conn.logged_on = True
        self.logons += 1
        self.distribution.attach(conn.session)

    def _gone(self, conn: _Conn) -> None:
        session = conn.session
        session.disconnected()
        self._conns.discard(conn)
        if session.peer is not None and self._active.get(session.peer) is conn:
            del self._active[session.peer]
        if not conn.logged_on:  # refused at logon, or never logged on
            kind = session.refused or "no_logon"
            self.refused[kind] = self.refused.get(kind, 0) + 1
        self._sent_closed += session.messages_sent
        self._garbled_closed += session.garbled
        self.distribution.detach(session)
        with contextlib.suppress(RuntimeError, OSError):
            conn.writer.close()

    def _write(self, conn: _Conn) -> None:
        out = conn.session.take_output()
        writer = conn.writer
        if out and not writer.is_closing():
            writer.write(out)
            if writer.transport.get_write_buffer_size() > self.settings.max_buffer_bytes:
                log.warning("fix_server_slow_consumer_closed peer=%s", conn.session.peer)
                self.slow_closed += 1
                conn.session.disconnected()
                writer.close()
                return
        if conn.session.closed:
            writer.close()  # flushes what was written (the Logout), then the reader ends

    async def _run_cadence(self) -> None:
        interval = self.settings.cadence_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                self.step()
            except Exception:  # a bug must not end delivery to every consumer silently
                log.exception("fix_server_cadence_failed")

    def step(self) -> None:
        """One cadence: the coalesced updates, every session's timers, what each has to say."""
        self.distribution.flush()
        for conn in list(self._conns):
            conn.session.poll()
            self._write(conn)
