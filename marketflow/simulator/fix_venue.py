"""A FIX 4.4 market-data venue (acceptor) for tests, demos and failover drills.

``python -m marketflow.simulator --protocol fix --port 40111 [--rate N] [--gap-every N]
[--trade-log PATH] [--no-resend] [--depth N] [--spread F] [--offset F] [--volatility F]
[--revert F] [--tick-bp F]``. It accepts Logon, answers TestRequests, sends a 35=W snapshot
per symbol on MarketDataRequest and then 35=X incrementals: bid and offer around a random-walk
mid price and trades between them. All clients share one market. Sessions (by the initiator's
CompID) keep their MsgSeqNums across reconnects and answer ResendRequests from a bounded history
(fix_venue_session.py); ``--no-resend`` answers them with a Reject instead, as venues that cannot
resend do. ``--gap-every N`` drops (numbers but does not write) every Nth market-data message
per client; ``--trade-log`` appends every trade written to at least one client (first send or
resend) as a JSON line ``{"symbol", "price", "timestamp"}``: the oracle of the tests.

The book: ``--spread`` is the half-spread and ``--offset`` shifts the whole book, both as a
fraction of the mid; ``--volatility`` is the largest relative step of the mid per update and
``--revert`` pulls the mid back toward its start by that fraction per update, so two venues
with different seeds wander around the same price and their books overlap, and now and then
cross or lock (what ``make run`` uses for the world view). ``--tick-bp F`` puts every price on
a grid of F basis points of the start price (0: the plain decimals), as venues quote on a tick
grid: two venues' prices can then be equal (a locked view). ``--depth N`` (default 1, the
top of book as before) serves N price levels a side with sizes (271) and positions (290) to
initiators that ask for MarketDepth (264) other than 1: the snapshot lists them, each update
sends the levels that changed (279=0 new, 1 changed size, 2 deleted); an initiator asking
for 264=1 gets the top of book as before.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import orjson

from marketflow.adapters.fix.codec import FieldValue, FixFramer, parse_fields
from marketflow.adapters.fix.timestamps import format_utc_time
from marketflow.settings import DEFAULT_PAIRS
from marketflow.simulator.fix_venue_session import Client, Trade, VenueSession
from marketflow.simulator.running import run_venue, serve_until_signalled

log = logging.getLogger("marketflow.simulator.fix")

_STARTS = {"BTCUSDT": 100000.0, "DOGEUSDT": 0.30, "TONUSDT": 3.9, "SOLUSDT": 200.0}
_STARTS["ETHUSDT"] = 3050.0
_MAX_CLIENT_BUFFER = 4 * 1024 * 1024  # a client this far behind is dropped, as venues do
_TICK_S = 0.01


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class FixVenue:
    """The acceptor: ``await start()``, ``await stop()``; ``port`` is the bound port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        symbols: Sequence[str] = DEFAULT_PAIRS,
        seed: int | None = None,
        rate: float = 50.0,
        gap_every: int = 0,
        trade_log: Path | None = None,
        comp_id: str = "VENUE",
        history: int = 100_000,
        resend: bool = True,
        depth: int = 1,
        spread: float = 1e-4,
        offset: float = 0.0,
        volatility: float = 1e-3,
        revert: float = 0.0,
        tick_bp: float = 0.0,
    ) -> None:
        self.host = host
        self.depth = depth
        self.spread = spread
        self.offset = offset
        self.volatility = volatility
        self.revert = revert
        self.port = port
        self.rate = rate
        self.gap_every = gap_every
        self.comp_id = comp_id
        self.history = history
        self.resend = resend
        self.trades_sent = 0
        self.resends = 0
        self.sessions: dict[str, VenueSession] = {}  # by the initiator's CompID
        self._rng = random.Random(seed)
        self._mids = {s: _STARTS.get(s, 100.0) for s in symbols}
        self._starts = dict(self._mids)
        self._ticks = {s: m * tick_bp * 1e-4 for s, m in self._mids.items()} if tick_bp else {}
        # symbol -> (bid levels, offer levels) as last sent to depth subscribers: price -> size
        self._levels: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        self._decimals = {s: max(2, 6 - math.floor(math.log10(m))) for s, m in self._mids.items()}
        self._last_trade = {s: self._fmt(s, m) for s, m in self._mids.items()}
        self._trade_no = 0
        self._trade_prefix = f"{time.time_ns():x}-"  # trade ids stay unique across restarts
        self._trade_log_path = trade_log
        self._trade_log: TextIO | None = None
        self._clients: set[Client] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._market: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._open_trade_log()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._market = asyncio.create_task(self._run_market(), name="fix-venue-market")
        log.info("fix_venue_listening host=%s port=%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, close every client after flushing what was sent, stop the market."""
        if self._server is None:
            return
        self._server.close()
        if self._market is not None:
            self._market.cancel()
            await asyncio.gather(self._market, return_exceptions=True)
        # Closing a transport flushes what was written, then the handler reads EOF and ends;
        # cancelling handlers instead would make asyncio log their CancelledError.
        for client in list(self._clients):
            client.writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        await self._server.wait_closed()
        self._server = None
        if self._trade_log is not None:
            self._trade_log.close()
            self._trade_log = None

    async def __aenter__(self) -> FixVenue:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _open_trade_log(self) -> None:
        if self._trade_log_path is not None:
            self._trade_log = self._trade_log_path.open("a", encoding="utf-8")

    def _fmt(self, symbol: str, price: float) -> str:
        tick = self._ticks.get(symbol)
        if tick:
            price = round(price / tick) * tick
        return f"{price:.{self._decimals[symbol]}f}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        client = Client(writer, self.comp_id, self.gap_every, self._delivered)
        self._clients.add(client)
        try:
            await self._serve(reader, client)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(client)
            self._handlers.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, client: Client) -> None:
        framer = FixFramer()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for frame in framer.feed(data):
                if not isinstance(frame, bytes):
                    log.warning("fix_venue_bad_frame reason=%s", frame.reason)
                    continue
                if not self._on_message(client, parse_fields(frame)):
                    await client.writer.drain()
                    return
            await client.writer.drain()

    def _on_message(self, client: Client, pairs: list[tuple[int, bytes]]) -> bool:
        """Handle one message from the initiator; False to close the connection."""
        fields = dict(pairs)
        msg_type = fields.get(35, b"")
        now = _now_ms()
        if not client.logged_on:
            return msg_type == b"A" and self._on_logon(client, fields, now)
        if not self._in_sequence(client, fields, now):
            return False
        if msg_type == b"1":
            client.send("0", [(112, fields.get(112, b""))], now)
        elif msg_type == b"2":
            self._on_resend_request(client, fields, now)
        elif msg_type == b"4":
            new_seq = int(fields.get(36, b"0") or b"0")
            client.session.in_seq = max(client.session.in_seq, new_seq)
        elif msg_type == b"5":
            client.send("5", [], now)
            return False
        elif msg_type == b"V":
            symbols = [value.decode(errors="replace") for tag, value in pairs if tag == 55]
            self._on_md_request(client, fields, symbols, now)
        return True

    def _on_logon(self, client: Client, fields: dict[int, bytes], now: int) -> bool:
        client.peer = fields.get(49, b"?").decode(errors="replace")
        session = self.sessions.get(client.peer)
        if session is None:
            session = self.sessions[client.peer] = VenueSession(self.history)
        client.session = session
        reset = fields.get(141) == b"Y"
        if reset:
            session.reset()
        client.heartbeat_s = float(fields.get(108, b"30") or b"30")
        seq = int(fields.get(34, b"0") or b"0")
        gap_from = session.in_seq if seq > session.in_seq else None
        if not self._in_sequence(client, fields, now):
            return False
        client.logged_on = True
        answer: list[tuple[int, FieldValue]] = [(98, 0), (108, fields.get(108, b"30"))]
        client.send("A", [*answer, (141, "Y")] if reset else answer, now)
        if gap_from is not None:  # what a real acceptor does: ask the initiator to resend
            client.send("2", [(7, gap_from), (16, 0)], now)
        return True

    def _in_sequence(self, client: Client, fields: dict[int, bytes], now: int) -> bool:
        """The initiator's MsgSeqNum: too low without PossDup ends the session (so a client
        whose number went back is caught); too high asks for a resend; PossDup below is
        ignored."""
        session = client.session
        seq = int(fields.get(34, b"0") or b"0")
        if seq < session.in_seq:
            if fields.get(43) == b"Y":
                return True
            text = f"MsgSeqNum too low, expecting {session.in_seq} but received {seq}"
            log.warning("fix_venue_seq_too_low peer=%s %s", client.peer, text)
            client.send("5", [(58, text)], now)
            return False
        if seq > session.in_seq and fields.get(35) != b"A":
            client.send("2", [(7, session.in_seq), (16, 0)], now)
        session.in_seq = seq + 1
        return True

    def _on_resend_request(self, client: Client, fields: dict[int, bytes], now: int) -> None:
        begin = int(fields.get(7, b"1") or b"1")
        end = int(fields.get(16, b"0") or b"0")
        if not self.resend:
            refused: list[tuple[int, FieldValue]] = [(45, fields.get(34, b"0")), (372, "2")]
            refused.append((58, "resend not supported"))
            client.send("3", refused, now)
            return
        self.resends += client.resend(begin, end, now)

    def _on_md_request(
        self, client: Client, fields: dict[int, bytes], requested: list[str], now: int
    ) -> None:
        req_id = fields.get(262, b"").decode(errors="replace")
        if fields.get(263) == b"2":
            if req_id == client.md_req_id:
                client.md_req_id = None
            return
        symbols = [s for s in requested if s in self._mids]
        if not symbols:
            client.send("Y", [(262, req_id), (281, 0), (58, "unknown symbol")], now)
            return
        client.md_req_id = req_id
        client.symbols = frozenset(symbols)
        asked = int(fields.get(264, b"1") or b"1") if fields.get(264, b"1").isdigit() else 1
        client.depth = self.depth if self.depth > 1 and asked != 1 else 1
        time_only = format_utc_time(now)
        for symbol in symbols:
            if client.depth > 1:
                client.send("W", self._depth_snapshot(req_id, symbol, time_only), now)
                continue
            bid, ask = self._quote(symbol)
            client.send(
                "W",
                [(262, req_id), (55, symbol), (268, 3),
                 (269, 0), (270, bid), (271, 1), (269, 1), (270, ask), (271, 1),
                 (269, 2), (270, self._last_trade[symbol]), (271, 1), (273, time_only)],
                now,
            )  # fmt: skip

    def _quote(self, symbol: str) -> tuple[str, str]:
        mid = self._mids[symbol] * (1 + self.offset)
        half = mid * self.spread
        return self._fmt(symbol, mid - half), self._fmt(symbol, mid + half)

    def quotes(self, symbol: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The book a depth subscriber has now: (bids, offers) of (price, size), best first."""
        bids, offers = self._levels.get(symbol) or self._make_levels(symbol)
        return (
            sorted(bids.items(), key=lambda kv: -float(kv[0])),
            sorted(offers.items(), key=lambda kv: float(kv[0])),
        )

    def _make_levels(self, symbol: str) -> tuple[dict[str, str], dict[str, str]]:
        """``depth`` levels a side one half-spread apart, sizes drawn per update."""
        bid, ask = (float(p) for p in self._quote(symbol))
        step = self._mids[symbol] * self.spread
        rng = self._rng
        bids = {
            self._fmt(symbol, bid - i * step): f"{rng.uniform(0.1, 5):.3f}"
            for i in range(self.depth)
        }
        offers = {
            self._fmt(symbol, ask + i * step): f"{rng.uniform(0.1, 5):.3f}"
            for i in range(self.depth)
        }
        self._levels[symbol] = (bids, offers)
        return bids, offers

    def _depth_snapshot(
        self, req_id: str, symbol: str, time_only: str
    ) -> list[tuple[int, FieldValue]]:
        bids, offers = self.quotes(symbol)
        entries: list[tuple[int, FieldValue]] = []
        for kind, side in ((0, bids), (1, offers)):
            for pos, (price, size) in enumerate(side, 1):
                entries += [(269, kind), (270, price), (271, size), (290, pos)]
        entries += [(269, 2), (270, self._last_trade[symbol]), (271, 1), (273, time_only)]
        return [(262, req_id), (55, symbol), (268, len(bids) + len(offers) + 1), *entries]

    def _depth_changes(self, symbol: str, time_only: str) -> list[tuple[int, FieldValue]]:
        """The book entries of one update for depth subscribers: deletes, then new and changed
        levels, against what they were sent last."""
        old = self._levels.get(symbol) or self._make_levels(symbol)
        new = self._make_levels(symbol)
        out: list[tuple[int, FieldValue]] = [(268, 0)]  # the count, set below
        for kind in (0, 1):
            before, after = old[kind], new[kind]
            for price in before:
                if price not in after:
                    out += [(279, 2), (269, kind), (55, symbol), (270, price), (273, time_only)]
            for price, size in after.items():
                if before.get(price) != size:
                    action = 1 if price in before else 0
                    out += [(279, action), (269, kind), (55, symbol), (270, price), (271, size)]
                    out.append((273, time_only))
        out[0] = (268, sum(1 for tag, _ in out if tag == 279))
        return out

    async def _run_market(self) -> None:
        symbols = list(self._mids)
        owed = 0.0
        i = 0
        while True:
            await asyncio.sleep(_TICK_S)
            self._heartbeats()
            owed += self.rate * _TICK_S
            while owed >= 1.0:
                owed -= 1.0
                self._update(symbols[i % len(symbols)])
                i += 1
            if self._trade_log is not None:
                self._trade_log.flush()

    def _heartbeats(self) -> None:
        now = time.monotonic()
        for client in list(self._clients):
            if client.logged_on and now - client.last_sent >= client.heartbeat_s:
                client.send("0", [], _now_ms())

    def _update(self, symbol: str) -> None:
        mid = self._mids[symbol] * (1 + self._rng.uniform(-self.volatility, self.volatility))
        mid += self.revert * (self._starts[symbol] - mid)
        self._mids[symbol] = mid
        bid, ask = self._quote(symbol)
        now = _now_ms()
        time_only = format_utc_time(now)
        fields: list[tuple[int, FieldValue]] = [
            (279, 1), (269, 0), (55, symbol), (270, bid), (271, 1), (273, time_only),
            (279, 1), (269, 1), (55, symbol), (270, ask), (271, 1), (273, time_only),
        ]  # fmt: skip
        trade: Trade | None = None
        if self._rng.random() < 0.6:
            price = self._fmt(symbol, mid * (1 + self._rng.uniform(-1e-4, 1e-4)))
            trade = Trade(symbol, price, now)
            self._trade_no += 1
            fields += [(279, 0), (269, 2), (55, symbol), (270, price), (271, 0.5)]
            fields += [(273, time_only), (1003, f"{self._trade_prefix}{self._trade_no}")]
        fields.insert(0, (268, 2 if trade is None else 3))
        deep: list[tuple[int, FieldValue]] | None = None
        if self.depth > 1:  # the depth subscribers' message: the changed levels, the trade
            changes = self._depth_changes(symbol, time_only)
            count = changes[0][1]
            assert isinstance(count, int)
            deep = [(268, count + (trade is not None)), *changes[1:], *fields[13:]]
        for client in list(self._clients):
            if client.md_req_id is None or symbol not in client.symbols:
                continue
            if client.writer.transport.get_write_buffer_size() > _MAX_CLIENT_BUFFER:
                log.warning("fix_venue_slow_client_dropped peer=%s", client.peer)
                client.writer.close()
                self._clients.discard(client)
                continue
            client.send("X", deep if client.depth > 1 and deep is not None else fields, now, trade)

    def _delivered(self, trade: Trade) -> None:
        """A trade was written to a client (sent or resent): log it the first time."""
        if trade.logged:
            return
        trade.logged = True
        self._last_trade[trade.symbol] = trade.price
        self.trades_sent += 1
        if self._trade_log is not None:
            line = {"symbol": trade.symbol, "price": float(trade.price)}
            line["timestamp"] = trade.timestamp_ms
            self._trade_log.write(orjson.dumps(line).decode() + "\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m marketflow.simulator --protocol fix",
        description="A FIX 4.4 market-data venue (acceptor): snapshots and incrementals.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=40111)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rate", type=float, default=50.0, help="MD updates per second")
    parser.add_argument(
        "--gap-every",
        type=int,
        default=0,
        metavar="N",
        help="skip a MsgSeqNum every N market-data messages (0: never)",
    )
    parser.add_argument(
        "--trade-log",
        type=Path,
        default=None,
        metavar="PATH",
        help="append every trade sent as a JSON line",
    )
    parser.add_argument("--pairs", default=",".join(DEFAULT_PAIRS))
    parser.add_argument("--comp-id", default="VENUE", help="our SenderCompID")
    parser.add_argument(
        "--no-resend", action="store_true", help="answer ResendRequests with a Reject"
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=1,
        metavar="N",
        help="price levels a side for initiators asking 264 != 1 (default 1)",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=1e-4,
        metavar="F",
        help="half-spread as a fraction of the mid (default 1e-4)",
    )
    parser.add_argument(
        "--offset",
        type=float,
        default=0.0,
        metavar="F",
        help="shift of the whole book as a fraction of the mid (default 0)",
    )
    parser.add_argument(
        "--volatility",
        type=float,
        default=1e-3,
        metavar="F",
        help="largest relative step of the mid per update (default 1e-3)",
    )
    parser.add_argument(
        "--revert",
        type=float,
        default=0.0,
        metavar="F",
        help="pull of the mid toward its start per update (default 0)",
    )
    parser.add_argument(
        "--tick-bp", type=float, default=0.0, metavar="F",
        help="price grid in basis points of the start price (default 0: plain decimals)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.depth < 1:
        parser.error("--depth must be at least 1")
    return args


async def _serve(args: argparse.Namespace) -> None:
    venue = FixVenue(
        args.host, args.port, symbols=[p for p in args.pairs.split(",") if p], seed=args.seed,
        rate=args.rate, gap_every=args.gap_every, trade_log=args.trade_log, comp_id=args.comp_id,
        resend=not args.no_resend, depth=args.depth, spread=args.spread, offset=args.offset,
        volatility=args.volatility, revert=args.revert, tick_bp=args.tick_bp,
    )  # fmt: skip
    await serve_until_signalled(venue)


def main(argv: list[str] | None = None) -> int:
    """Run the venue until SIGINT/SIGTERM; ``argv`` excludes the program name."""
    return run_venue(_serve(_parse_args(argv)), log, "fix_venue_failed")
