"""A scripted JSON exchange for exactness tests: every line it sends is recorded.

The exchange speaks docs/protocols.md (newline JSON over TCP, the client sends nothing) to
one client at a time: a newer connection replaces the older one, as after a daemon restart.
Each tick is recorded with its symbol, price, exchange timestamp, the wall time its line was
handed to the kernel and the connection it went out on, so a test knows exactly what the daemon
could have seen, and when.

Exchange time is compressed: :class:`ExchangeClock` starts in the past and runs ``speed`` times
faster than the wall clock until it catches up with it (then it follows the wall clock, never
ahead: the daemon rejects ticks far ahead of receipt). Gaps are ranges of exchange time with no
ticks; ``jump()`` moves exchange time forward at once (time passing while nobody listens).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from dataclasses import dataclass, field

import orjson

from tests.e2e.procs import poll

START_PRICES = {"BTCUSDT": 100_000.0, "ETHUSDT": 3_050.0, "DOGEUSDT": 0.30, "SOLUSDT": 200.0}


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ExchangeClock:
    """Exchange time in epoch ms: ``start_ms`` at ``t0``, ``speed`` x faster, capped at wall."""

    def __init__(self, start_ms: int, speed: float) -> None:
        self.t0 = time.time()
        self.start_ms = start_ms
        self.speed = speed
        self.offset_ms = 0
        self.gaps: list[tuple[int, int]] = []  # [lo, hi) exchange ms without ticks

    def now_ms(self) -> int:
        now = time.time()
        ex = self.start_ms + (now - self.t0) * 1000 * self.speed + self.offset_ms
        return min(int(ex), int(now * 1000))

    def caught_up_at(self) -> float:
        """Wall time (s) at which exchange time reaches the wall clock (without jumps)."""
        lag_s = self.t0 - (self.start_ms + self.offset_ms) / 1000
        return self.t0 + lag_s / (self.speed - 1)

    def jump(self, ms: int) -> None:
        self.offset_ms += ms

    def in_gap(self, ts: int) -> bool:
        return any(lo <= ts < hi for lo, hi in self.gaps)


@dataclass(frozen=True, slots=True)
class Tick:
    exchange: str
    symbol: str
    price: float
    ts: int  # exchange timestamp, epoch ms
    sent_at: float  # wall time (s) the line was handed to the kernel
    conn: int  # connection number on this exchange
    optional: bool = False  # the daemon may legitimately drop it (e.g. beyond the retention)


@dataclass
class Conn:
    number: int
    accepted_at: float
    ended_at: float | None = None  # when the exchange saw it end (send failed or replaced)


@dataclass
class _Late:
    ts: int
    optional: bool


@dataclass
class ScriptedExchange:
    """One exchange: an acceptor thread and a sender thread sending ``rate_hz`` rounds/s."""

    name: str
    symbols: list[str]
    clock: ExchangeClock
    seed: int
    rate_hz: float = 100.0
    dup_prob: float = 0.05  # an identical line (same price, same ms) right after a tick
    late_per_restart: int = 2  # per symbol, into minutes 61-170 s back, on each new connection
    ticks: list[Tick] = field(default_factory=list)
    conns: list[Conn] = field(default_factory=list)
    paused: bool = False
    port: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._prices = {
            s: START_PRICES.get(s, 100.0) * self._rng.uniform(0.9, 1.1) for s in self.symbols
        }
        self._lock = threading.Lock()
        # Held from the paused check to the ticks' record: pause() waits on it, so no send
        # that began before a pause lands in the daemon after the oracle has read the ticks.
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._current: tuple[socket.socket, Conn] | None = None
        self._late: list[_Late] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        for target in (self._accept_loop, self._send_loop):
            t = threading.Thread(target=target, name=f"{self.name}-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        with self._lock:
            self._end_current()
        if self._sock is not None:
            self._sock.close()

    def send_late(self, ts_list: list[int], *, optional: bool) -> None:
        """Queue ticks with these exchange timestamps for the next round (any symbol)."""
        with self._lock:
            self._late.extend(_Late(ts, optional) for ts in ts_list)

    def connected(self) -> Conn | None:
        with self._lock:
            return None if self._current is None else self._current[1]

    # -- threads ---------------------------------------------------------------------------

    def _end_current(self) -> None:
        if self._current is None:
            return
        sock, conn = self._current
        conn.ended_at = time.time()
        self._current = None
        with contextlib.suppress(OSError):
            sock.close()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._end_current()
                conn = Conn(len(self.conns), time.time())
                self.conns.append(conn)
                self._current = (sock, conn)
                if conn.number > 0:  # a restart: a few late ticks into written minutes
                    now = self.clock.now_ms()
                    for _ in range(self.late_per_restart * len(self.symbols)):
                        ts = now - self._rng.randint(61_000, 170_000)
                        if not self.clock.in_gap(ts):
                            self._late.append(_Late(ts, False))

    def _round(self, ts: int, late: list[_Late]) -> list[tuple[str, float, int, bool]]:
        out: list[tuple[str, float, int, bool]] = []
        for sym in self.symbols:
            p = self._prices[sym] = self._prices[sym] * (1 + self._rng.uniform(-0.002, 0.002))
            out.append((sym, p, ts, False))
            if self._rng.random() < self.dup_prob:
                out.append((sym, p, ts, False))
        for item in late:
            sym = self._rng.choice(self.symbols)
            out.append(
                (sym, self._prices[sym] * self._rng.uniform(0.99, 1.01), item.ts, item.optional)
            )
        return out

    def _send_loop(self) -> None:
        period = 1 / self.rate_hz
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at = max(next_at + period, time.monotonic() - period)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with self._send_lock:
                self._send_round()

    def _send_round(self) -> None:
        with self._lock:
            current = self._current
            if current is None or self.paused:
                return
            ts = self.clock.now_ms()
            if self.clock.in_gap(ts):
                return
            late, self._late = self._late, []
        sock, conn = current
        batch = self._round(ts, late)
        data = b"".join(
            orjson.dumps({"symbol": s, "price": p, "timestamp": t}) + b"\n" for s, p, t, _ in batch
        )
        try:
            sock.sendall(data)
        except OSError:
            with self._lock:
                if self._current is current:
                    self._end_current()
        sent_at = time.time()
        self.ticks.extend(
            Tick(self.name, s, p, t, sent_at, conn.number, opt) for s, p, t, opt in batch
        )

    def pause(self, paused: bool) -> None:
        """Stop (or resume) sending; once a pause returns, every tick sent is in ``ticks``."""
        self.paused = paused
        if paused:
            with self._send_lock:  # a round that began before the pause has recorded its ticks
                pass


@dataclass
class ScriptedFeed:
    """Accepts the daemon's connections; ``send`` writes to the newest one."""

    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    conns: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def start(self) -> None:
        def serve() -> None:
            self.sock.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                self.conns.append(conn)

        threading.Thread(target=serve, daemon=True).start()

    def send(self, data: bytes) -> None:
        """Send on the newest open connection; after a closed one (a reconnect asked for),
        wait for the daemon's next."""

        def sent() -> bool:
            if not self.conns or self.conns[-1].fileno() == -1:
                return False
            try:
                self.conns[-1].sendall(data)
            except OSError:  # closed under us: the daemon reconnects
                return False
            return True

        poll(sent, bool, 30, "the daemon connects to the feed")

    def stop(self) -> None:
        self._stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def tick(symbol: str, price: float, ts: int) -> bytes:
    return orjson.dumps({"symbol": symbol, "price": price, "timestamp": ts}) + b"\n"
