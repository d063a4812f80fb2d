"""A WebSocket venue in Binance's combined-stream format (``--protocol websocket``).

``GET /stream?streams=btcusdt@trade/btcusdt@bookTicker/...`` upgrades to a WebSocket; a client
may also (or instead) send ``{"method":"SUBSCRIBE","params":[...],"id":N}``,
``UNSUBSCRIBE`` or ``LIST_SUBSCRIPTIONS`` and gets ``{"result":null,"id":N}`` (the list for
LIST_SUBSCRIPTIONS) or ``{"code":2,"msg":...,"id":N}`` for a request it cannot read. Every
round, each pair's mid moves once and the venue sends, to each client subscribed to it, a
``<pair>@trade`` frame at a price next to the mid and a ``<pair>@bookTicker`` frame with a bid
and an ask around it. Prices are decimal strings with 8 decimals, as Binance sends them. Every
client of one venue sees one market; a client whose send buffer is full is skipped for the
round (it misses frames, it never holds the others up).

The book model is the FIX venue's (fix_venue.py), with the same options and defaults, so a
WebSocket venue and FIX venues started alike overlap and now and then cross or lock:
``--volatility`` is the largest relative step of the mid per round, ``--revert`` pulls it back
toward its start by that fraction per round, ``--spread`` is the half-spread and ``--offset``
shifts the book, both as fractions of the mid, and ``--tick-bp F`` puts every price on a grid
of F basis points of the start price.

python -m marketflow.simulator --protocol websocket --port 40121 [--rate N] [--seed S]
    [--trade-log PATH] [--spread F] [--offset F] [--volatility F] [--revert F] [--tick-bp F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TextIO

import orjson
from aiohttp import WSMsgType, web

from marketflow.domain.walk import PAIRS, UNKNOWN_PAIR_START
from marketflow.simulator.json_exchange import start_prices
from marketflow.simulator.running import run_venue, serve_until_signalled

log = logging.getLogger("marketflow.simulator.ws")

DEFAULT_PORT = 40121
DEFAULT_RATE = 100.0  # frames/s per client subscribed to everything: 10 rounds/s of 5 pairs
_MAX_CLIENT_BUFFER = 1 << 20  # bytes queued for a client before it counts as not reading
_KINDS = ("trade", "bookTicker")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    streams: set[str] = field(default_factory=set)


class WsVenue:
    """An aiohttp server on ``host:port`` serving ``/stream``; ``async with`` runs it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        pairs: Sequence[str] = PAIRS,
        rate: float = DEFAULT_RATE,
        seed: int | None = None,
        trade_log: Path | None = None,
        spread: float = 1e-4,
        offset: float = 0.0,
        volatility: float = 1e-3,
        revert: float = 0.0,
        tick_bp: float = 0.0,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.host = host
        self.port = port
        self.rate = rate
        self.pairs = tuple(pairs)
        self.spread = spread
        self.offset = offset
        self.volatility = volatility
        self.revert = revert
        starts = start_prices(port)
        self._starts = {p: starts.get(p, UNKNOWN_PAIR_START) for p in self.pairs}
        self._mids = dict(self._starts)
        self._ticks = {p: m * tick_bp * 1e-4 for p, m in self._starts.items()} if tick_bp else {}
        self._rng = random.Random(seed)
        self._clients: set[_Client] = set()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self._trade_id = 0
        self.frames_sent = 0
        self.subscribes = 0  # SUBSCRIBE requests and ?streams= connections served
        # Every trade sent to at least one client, as a JSON line: the tests' oracle.
        self._trade_log_path = trade_log
        self._trade_log: TextIO | None = None
        # True: every round sends a ping instead of data (a venue whose streams stalled while
        # its link lives): what a client must see as stale.
        self.silent = False

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = sock.getsockname()[1]  # the bound one when port 0 was asked for
        await web.SockSite(self._runner, sock).start()
        if self._trade_log_path is not None and self._trade_log is None:
            self._trade_log = self._trade_log_path.open("a", buffering=1)
        self._task = asyncio.create_task(self._run(), name=f"ws-venue:{self.port}")
        log.info("simulator_listening host=%s port=%d rate=%s protocol=websocket",
                 self.host, self.port, self.rate)  # fmt: skip

    async def aclose(self) -> None:
        """Stop sending and close every client (safe to call twice)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            for client in list(self._clients):
                await client.ws.close()
            await runner.cleanup()
            if self._trade_log is not None:
                self._trade_log.close()
                self._trade_log = None
            log.info("simulator_stopped port=%d frames_sent=%d", self.port, self.frames_sent)

    async def __aenter__(self) -> WsVenue:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        transport = request.transport
        if transport is not None:
            # Far above the point where a client is skipped: a send never waits for a slow
            # reader's socket (which would hold up every other client's round).
            transport.set_write_buffer_limits(high=4 * _MAX_CLIENT_BUFFER)
        client = _Client(ws, transport)
        query = request.query.get("streams", "")
        client.streams.update(s for s in query.split("/") if s)
        self.subscribes += bool(client.streams)
        self._clients.add(client)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await ws.send_str(self._request(client, msg.data).decode())
        finally:
            self._clients.discard(client)
        return ws

    def _request(self, client: _Client, text: str) -> bytes:
        """The reply to one client request (Binance's WebSocket API)."""
        try:
            req = orjson.loads(text)
            method, req_id = req["method"], req["id"]
            params = req.get("params", [])
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                raise TypeError("params must be a list of stream names")  # noqa: TRY301
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return orjson.dumps({"code": 2, "msg": "Invalid request", "id": None})
        if method == "SUBSCRIBE":
            client.streams.update(params)
            self.subscribes += 1
            return orjson.dumps({"result": None, "id": req_id})
        if method == "UNSUBSCRIBE":
            client.streams.difference_update(params)
            return orjson.dumps({"result": None, "id": req_id})
        if method == "LIST_SUBSCRIPTIONS":
            return orjson.dumps({"result": sorted(client.streams), "id": req_id})
        return orjson.dumps({"code": 2, "msg": f"Unknown method {method!r}", "id": req_id})

    def _fmt(self, pair: str, price: float) -> str:
        tick = self._ticks.get(pair)
        if tick:
            price = round(price / tick) * tick
        return f"{price:.8f}"

    def _step(self, pair: str) -> float:
        """The pair's mid after one round (the FIX venue's model)."""
        mid = self._mids[pair] * (1 + self._rng.uniform(-self.volatility, self.volatility))
        mid += self.revert * (self._starts[pair] - mid)
        self._mids[pair] = mid
        return mid

    def _round(self) -> dict[str, str]:
        """One step of every pair: the frame of each stream, by stream name."""
        now = _now_ms()
        uniform = self._rng.uniform
        fmt = self._fmt
        frames: dict[str, str] = {}
        for pair in self.pairs:
            mid = self._step(pair)
            low = pair.lower()
            self._trade_id += 1
            trade = {"e": "trade", "E": now, "s": pair, "t": self._trade_id,
                     "p": fmt(pair, mid * (1 + uniform(-1e-4, 1e-4))),
                     "q": f"{uniform(0.001, 5):.8f}", "T": now,
                     "m": self._rng.random() < 0.5, "M": True}  # fmt: skip
            center = mid * (1 + self.offset)
            half = center * self.spread
            book = {"u": self._trade_id, "s": pair,
                    "b": fmt(pair, center - half), "B": f"{uniform(0.1, 50):.8f}",
                    "a": fmt(pair, center + half), "A": f"{uniform(0.1, 50):.8f}"}  # fmt: skip
            for kind, data in (("trade", trade), ("bookTicker", book)):
                name = f"{low}@{kind}"
                frames[name] = orjson.dumps({"stream": name, "data": data}).decode()
        return frames

    async def _run(self) -> None:
        """Rounds on schedule until cancelled."""
        loop = asyncio.get_running_loop()
        round_s = len(self.pairs) * len(_KINDS) / self.rate
        due = loop.time()
        while True:
            due += round_s
            if self._clients and self.silent:
                for client in list(self._clients):
                    if not client.ws.closed:
                        with contextlib.suppress(ConnectionError):
                            await client.ws.ping()
            elif self._clients:
                frames = self._round()
                sent: set[str] = set()
                for client in list(self._clients):
                    await self._send(client, frames, sent)
                self._log_trades(frames, sent)
            delay = due - loop.time()
            if delay < -1.0:  # far behind (a stalled machine): skip, do not burst
                due = loop.time()
            await asyncio.sleep(max(delay, 0.0))

    def _log_trades(self, frames: dict[str, str], sent: set[str]) -> None:
        if self._trade_log is None:
            return
        for name in sent:
            if name.endswith("@trade"):
                data = orjson.loads(frames[name])["data"]
                line = {"symbol": data["s"], "price": float(data["p"]), "timestamp": data["T"]}
                self._trade_log.write(orjson.dumps(line).decode() + "\n")

    async def _send(self, client: _Client, frames: dict[str, str], sent: set[str]) -> None:
        transport = client.transport
        if client.ws.closed or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > _MAX_CLIENT_BUFFER:
            return  # this reader is behind: it misses the round
        try:
            for name in client.streams:
                frame = frames.get(name)
                if frame is not None:
                    await client.ws.send_str(frame)
                    sent.add(name)
                    self.frames_sent += 1
        except ConnectionError:
            self._clients.discard(client)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m marketflow.simulator --protocol websocket",
        description="A WebSocket venue: Binance combined streams (trade, bookTicker) on /stream.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"frames/s per client subscribed to every stream "
                        f"(default: {DEFAULT_RATE:g})")  # fmt: skip
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--trade-log", type=Path, default=None, metavar="PATH",
                        help="append every trade sent as a JSON line")  # fmt: skip
    parser.add_argument("--spread", type=float, default=1e-4,
                        help="half-spread as a fraction of the mid (default 1e-4)")  # fmt: skip
    parser.add_argument("--offset", type=float, default=0.0,
                        help="shift of the book as a fraction of the mid (default 0)")  # fmt: skip
    parser.add_argument("--volatility", type=float, default=1e-3,
                        help="largest relative mid step per round (default 1e-3)")  # fmt: skip
    parser.add_argument("--revert", type=float, default=0.0,
                        help="pull of the mid toward its start per round (default 0)")  # fmt: skip
    parser.add_argument("--tick-bp", type=float, default=0.0, metavar="F",
                        help="price grid in basis points of the start price (0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be 1..65535")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    return args


async def _serve(args: argparse.Namespace) -> None:
    pairs = [p for p in args.pairs.split(",") if p]
    venue = WsVenue(
        args.host, args.port, pairs=pairs, rate=args.rate, seed=args.seed,
        trade_log=args.trade_log, spread=args.spread, offset=args.offset,
        volatility=args.volatility, revert=args.revert, tick_bp=args.tick_bp,
    )  # fmt: skip
    await serve_until_signalled(venue)


def main(argv: list[str] | None = None) -> int:
    """Run the venue until SIGINT/SIGTERM; ``argv`` excludes the program name."""
    return run_venue(_serve(_parse_args(argv)), log, "ws_venue_failed")
