"""A stand-in for the reference exchange programs: newline JSON prices over TCP.

Behaviour (docs/protocols.md, JSON ticks): streaming starts at connect, the client sends nothing;
every 100 ms one line per pair, all with the same wall-clock timestamp; every client of one
port gets the lines of ONE shared price walk; a client that goes away is dropped and the
server never closes a connection itself.

``rate`` raises the pace far beyond 50 lines/s for benchmarks. Lines are then built in bulk,
one time slice at a time, and written with the transport's flow control: a client whose
socket buffer is full is skipped until it drains (never an unbounded buffer), and when no
client can take data the walk waits instead of burning the CPU the reader needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import cast

from marketflow.domain.walk import PAIRS, VENUE_START_PRICES, PriceWalk, render_rounds

log = logging.getLogger("marketflow.simulator")

DEFAULT_RATE = 50  # lines/s per connection, as the reference programs send
MIN_SLICE_S = 0.005  # at high rates, lines are built for this much time at once
MAX_BACKLOG_S = 0.1  # behind schedule by more than this (a stalled reader): skip, not burst
WRITE_HIGH_WATER = 1 << 20  # bytes buffered per client before it counts as not reading
DEFAULT_PORT = 40101
# The reference programs listen on 40101, 40102, 40103, each with its own starting prices.
START_PRICES: Mapping[int, Mapping[str, float]] = {
    DEFAULT_PORT + i: prices for i, prices in enumerate(VENUE_START_PRICES)
}


def now_ms() -> int:
    """Wall clock, Unix epoch milliseconds (the feed's timestamp)."""
    return time.time_ns() // 1_000_000


class _Client(asyncio.Protocol):
    """One connection: tracks whether its socket can take more data."""

    def __init__(self, exchange: JsonExchange) -> None:
        self._exchange = exchange
        self.transport: asyncio.WriteTransport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.WriteTransport subclasses: a cast, not a check.
        transport = cast(asyncio.WriteTransport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.transport = transport
        self._exchange.attach(self)

    def data_received(self, data: bytes) -> None:
        """Clients send nothing; whatever they do send is ignored."""

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._exchange.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._exchange.detach(self)


class JsonExchange:
    """The server of one port: one price walk broadcast to every connected client."""

    def __init__(self, walk: PriceWalk, rate: float = DEFAULT_RATE) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.walk = walk
        self.rate = rate
        self.lines_sent = 0
        self._clients: set[_Client] = set()
        self._writable = asyncio.Event()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def protocol(self) -> _Client:
        """Protocol factory for ``loop.create_server``."""
        return _Client(self)

    def attach(self, client: _Client) -> None:
        self._clients.add(client)
        self._writable.set()

    def detach(self, client: _Client) -> None:
        self._clients.discard(client)

    def wake(self) -> None:
        self._writable.set()

    def _broadcast(self, data: bytes) -> int:
        sent = 0
        for client in self._clients:
            transport = client.transport
            if client.paused or transport is None or transport.is_closing():
                continue  # this reader is behind: it misses these lines, it gets no backlog
            transport.write(data)
            sent += 1
        return sent

    def _any_writable(self) -> bool:
        return any(not c.paused for c in self._clients)

    async def run(self) -> None:
        """Produce rounds on schedule until cancelled (a round = one line per pair)."""
        loop = asyncio.get_running_loop()
        pairs = len(self.walk.pairs)
        rounds_per_s = self.rate / pairs
        round_s = 1.0 / rounds_per_s
        # At high rates, wake once per slice and build all the rounds due at once.
        min_sleep_s = MIN_SLICE_S if round_s < MIN_SLICE_S else 0.0
        max_due = max(int(rounds_per_s * MAX_BACKLOG_S), 1)
        base = loop.time()
        done = 0  # rounds produced since base; round k is due at base + k * round_s
        while True:
            if not self._any_writable():
                self._writable.clear()
                await self._writable.wait()
                base, done = loop.time(), 0  # nobody could listen meanwhile: no burst
            now = loop.time()
            due = int((now - base) * rounds_per_s) - done
            if due > max_due:  # stalled (a slow machine, a paused reader): skip, not burst
                base, done, due = now - round_s, 0, 1
            if due > 0:
                data = render_rounds(self.walk, due, now_ms())
                done += due
                if self._broadcast(data):
                    self.lines_sent += due * pairs
            await asyncio.sleep(max(base + (done + 1) * round_s - loop.time(), min_sleep_s))


def start_prices(port: int) -> Mapping[str, float]:
    """Starting prices of the reference program on ``port`` (40101's for any other port)."""
    return START_PRICES.get(port, START_PRICES[DEFAULT_PORT])


def walk_for_port(port: int, pairs: Sequence[str] = PAIRS, seed: int | None = None) -> PriceWalk:
    """The walk of the reference program listening on ``port``."""
    return PriceWalk(start_prices(port), pairs, seed)


async def serve(host: str, port: int, rate: float, seed: int | None) -> None:
    """Listen on ``host:port`` until cancelled; the walk starts at ``port``'s prices."""
    exchange = JsonExchange(walk_for_port(port, seed=seed), rate)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(exchange.protocol, host, port, reuse_address=True)
    log.info("simulator_listening host=%s port=%d rate=%s protocol=json", host, port, rate)
    producer = asyncio.create_task(exchange.run(), name=f"simulator:{port}")
    try:
        await producer
    finally:
        producer.cancel()
        server.close()
        log.info("simulator_stopped port=%d lines_sent=%d", port, exchange.lines_sent)
