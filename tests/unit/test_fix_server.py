"""The FIX server's I/O around the acceptor session, on loopback sockets: one session per
CompID, the session cap, refusals counted by reason, a Logout to everyone on stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from marketflow.adapters.fix.acceptor import AcceptorPolicy, AcceptorSession, Refusal
from marketflow.adapters.fix.codec import FixFramer, encode, parse_fields
from marketflow.adapters.fix.seq_store import SequenceStore
from marketflow.app.fix_distribution import Distribution
from marketflow.app.world_view import WorldView
from marketflow.entrypoints.fix_server import FixServer
from marketflow.settings import FixServerSettings, WorldViewSettings

ME = "MARKETFLOW"
SENT = "20260102-12:00:00.000"


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, me: str):
        self.reader, self.writer, self.me = reader, writer, me
        self.seq = 1
        self._framer = FixFramer()

    def send(self, msg_type: str, body: list[tuple[int, object]] | None = None) -> None:
        self.writer.write(encode(msg_type, body or [], sender=self.me, target=ME,  # type: ignore[arg-type]
                                 seq=self.seq, sending_time=SENT))  # fmt: skip
        self.seq += 1

    async def next(self) -> dict[int, bytes] | None:
        """The next message from the server; None at EOF."""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                return None
            frames = self._framer.feed(data)
            if frames:
                frame = frames[0]
                assert isinstance(frame, bytes)
                return dict(parse_fields(frame))


async def until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, "not reached in 5 s"
        await asyncio.sleep(0.01)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FixServer]:
    fs = FixServerSettings(enabled=True, port=0, allowed_comp_ids=("A", "B"), max_sessions=1,
                           cadence_ms=10, logout_timeout_s=1.0)  # fmt: skip
    view = WorldView(WorldViewSettings(), lambda: 0)
    dist = Distribution(view, ("BTCUSDT",), 5)
    policy = AcceptorPolicy(ME, fs.allowed_comp_ids, logout_timeout_s=fs.logout_timeout_s)

    def new_session(admit: Callable[[str], Refusal | None]) -> AcceptorSession:
        return AcceptorSession(
            policy, lambda p: SequenceStore(tmp_path / f"{p}.seq", ME, p), admit,
            monotonic=time.monotonic, wall_ms=lambda: 1_767_355_200_000,
        )  # fmt: skip

    srv = FixServer(fs, dist, new_session)
    await srv.start()
    yield srv
    await srv.aclose()


OPENED: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    for writer in OPENED:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    OPENED.clear()


async def connect(server: FixServer, me: str) -> Peer:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    OPENED.append(writer)
    return Peer(reader, writer, me)


async def test_one_session_per_comp_id_a_cap_and_refusals_counted(server: FixServer) -> None:
    first = await connect(server, "A")
    first.send("A", [(98, 0), (108, 5)])
    answer = await first.next()
    assert answer is not None
    assert answer[35] == b"A"

    refusals = []
    for me in ("A", "B", "Z"):  # the same CompID again, a second one past the cap, a stranger
        peer = await connect(server, me)
        peer.send("A", [(98, 0), (108, 5)])
        logout = await peer.next()
        assert logout is not None
        assert logout[35] == b"5"
        refusals.append(logout[58])
        assert await peer.next() is None  # then the link closes
    assert refusals == [b"a session for A is already logged on", b"too many sessions (max 1)",
                        b"SenderCompID 'Z' is not allowed"]  # fmt: skip
    garbage = await connect(server, "A")
    garbage.writer.write(b"GET / HTTP/1.1\r\n\r\n8=FIX.4.4\x019=5\x0135=A\x0110=000\x01")
    assert await garbage.next() is None

    await until(lambda: server.stats()["connections"] == 1)
    stats = server.stats()
    assert stats["sessions"] == 1
    assert stats["logons"] == 1
    assert stats["refused"] == {"comp_id": 1, "duplicate": 1, "no_logon": 1, "session_cap": 1}
    assert stats["garbled"] == 1  # the first unreadable frame before a Logon ends the link
    assert stats["messages_sent"] == 4  # our Logon and three refusing Logouts

    first.send("1", [(112, "PING")])  # the live session is untouched by all that
    beat = await first.next()
    assert beat is not None
    assert (beat[35], beat[112]) == (b"0", b"PING")


async def test_stop_logs_every_session_out(server: FixServer) -> None:
    peer = await connect(server, "B")
    peer.send("A", [(98, 0), (108, 5)])
    await peer.next()
    closing = asyncio.create_task(server.aclose())
    logout = await peer.next()
    assert logout is not None
    assert (logout[35], logout[58]) == (b"5", b"daemon stopping")
    peer.send("5")
    await asyncio.wait_for(closing, 5)
    assert await peer.next() is None
