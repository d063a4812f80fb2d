"""A scripted FIX 4.4 acceptor for e2e tests: it records every message the daemon sends it.

Its ``mode`` decides what a new connection gets: ``"slam"`` closes it at once (a venue that
is down but accepts TCP), ``"silent"`` answers the Logon and then says nothing (a dead link),
``"live"`` answers Logon, TestRequest and Logout. Messages are built and parsed by simplefix
(a third-party codec), never by marketflow's own.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import simplefix


@dataclass
class FixConn:
    number: int
    mode: str
    accepted_at: float
    received: list[dict[int, bytes]] = field(default_factory=list)
    eof_at: float | None = None  # when the daemon closed it

    def types(self) -> list[bytes]:
        return [m[35] for m in self.received]


@dataclass
class FixAcceptor:
    mode: str = "live"
    conns: list[FixConn] = field(default_factory=list)
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()

    def snapshot(self) -> list[FixConn]:
        with self._lock:
            return list(self.conns)

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                s, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                conn = FixConn(len(self.conns), self.mode, time.time())
                self.conns.append(conn)
            if conn.mode == "slam":
                s.close()
                conn.eof_at = time.time()
                continue
            threading.Thread(target=self._serve, args=(s, conn), daemon=True).start()

    def _serve(self, s: socket.socket, conn: FixConn) -> None:
        parser = simplefix.FixParser()
        seq = 1
        s.settimeout(0.2)

        def send(msg_type: str, fields: list[tuple[int, str]]) -> None:
            nonlocal seq
            m = simplefix.FixMessage()
            m.append_pair(8, "FIX.4.4", header=True)
            m.append_pair(35, msg_type, header=True)
            m.append_pair(49, "VENUE", header=True)
            m.append_pair(56, "MARKETFLOW", header=True)
            m.append_pair(34, seq, header=True)
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H:%M:%S.%f")[:-3]
            m.append_pair(52, stamp, header=True)
            for tag, value in fields:
                m.append_pair(tag, value)
            seq += 1
            with contextlib.suppress(OSError):
                s.sendall(m.encode())

        with s:
            while not self._stop.is_set():
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    conn.eof_at = time.time()
                    return
                parser.append_buffer(data)
                while (msg := parser.get_message()) is not None:
                    fields = {int(tag): value for tag, value in msg.pairs}
                    conn.received.append(fields)
                    kind = fields.get(35)
                    if kind == b"A":
                        send("A", [(98, "0"), (108, fields.get(108, b"1").decode()),
                                   (141, "Y")])  # fmt: skip
                    elif conn.mode == "live" and kind == b"1":
                        send("0", [(112, fields.get(112, b"").decode())])
                    elif conn.mode == "live" and kind == b"5":
                        send("5", [])
