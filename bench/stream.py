"""Stream benchmark: N WebSocket subscribers on the daemon, ingest with and without them.

    python -m bench.stream [--subscribers 1000] [--probes 20] [--channel ticks]
                           [--sources 2] [--pairs 5] [--paced-rate 50000] [--seconds 10]

One run, the daemon (its own process, pinned to CPU 0 when there are two) on real PostgreSQL
and Redis, fed by bench.firehose senders:

1. Paced senders (``--paced-rate`` lines/s in all, no queueing in socket buffers), the
   subscribers connected: change -> client latency p50/p99, from ``--probes`` of them that
   parse every frame. A tick's change is its exchange timestamp (the sender stamps each line
   when it sends it): the latency is flush + wait for the next cadence + send + read.
2. Saturating senders on the same ports, subscribers still connected: ingest ticks/s.
3. Subscribers closed: ingest ticks/s again, the figure without subscribers.

The other subscribers count the bytes they receive without parsing (cheap enough for one
process to read 1,000 of them); one more client subscribes and never reads (a raw socket
with a small receive buffer): the stuck client. ``stream.max_buffered_bytes`` is set to
``--max-buffered`` so that it is closed (1008) within the run.

``--channel bbo``: the senders' lines carry a best bid and ask too (``bench.firehose
--quotes``), so every pair's cross-venue view changes at every cadence; a probe's change time
is the newer of the best bid's and offer's quote times. ``ticks`` (the default) carries the
same shape of traffic from the ticks themselves. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.firehose import pair_names
from bench.ingest import Firehose, cpu_s, percentile, pin, settle, ticks
from tests.e2e.procs import Daemon
from tests.harness.services import PostgresServer, RedisServer, free_port

STEP_MS = 2  # latency samples per 2 ms of exchange time between two frames


class Counter(asyncio.Protocol):
    """A subscriber that counts what it receives and parses nothing."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.bytes = 0
        self.upgraded = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if not self.upgraded.done() and b"\r\n\r\n" in data:
            self.upgraded.set_result(data.startswith(b"HTTP/1.1 101"))


def _same(c: Counter) -> Counter:
    return c


def masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    assert n < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | n]) + mask + body


def upgrade_request(port: int, subscribe: bytes) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return head.encode() + masked(subscribe)  # the subscribe right behind the upgrade


async def connect_counters(port: int, n: int, subscribe: bytes) -> list[Counter]:
    loop = asyncio.get_running_loop()
    out: list[Counter] = []
    for start in range(0, n, 100):  # in batches: the daemon's accept backlog is finite
        batch = [Counter(upgrade_request(port, subscribe)) for _ in range(min(100, n - start))]
        await asyncio.gather(*(loop.create_connection(functools.partial(_same, c),
                                                      "127.0.0.1", port)
                               for c in batch))  # fmt: skip
        ok = await asyncio.gather(*(c.upgraded for c in batch))
        assert all(ok), "a subscriber was refused"
        out.extend(batch)
    return out


def stuck_client(port: int, subscribe: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(port, subscribe))
    return sock  # never read again


class Probe:
    """A subscriber that parses every frame. When a pair's newest stamp moves from t0 to t1
    in a frame received at T, every change stamped in (t0, t1] reached it at T: one sample
    T - s per ``STEP_MS`` of that range (the senders stamp at a constant rate), so the wait
    for the cadence counts for every change, not only for the newest one."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.frames = 0
        self.recording = False
        self._seen: dict[tuple[str, str], int] = {}

    async def run(self, session: aiohttp.ClientSession, url: str, subscribe: bytes) -> None:
        async with session.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_bytes(subscribe)
            async for msg in ws:
                now = time.time() * 1000
                doc = orjson.loads(msg.data)
                if doc.get("type") not in ("snapshot", "update"):
                    continue
                self.frames += 1
                for symbol, payload in doc["data"].items():
                    for ex, ts in _stamps(payload):
                        prev = self._seen.get((symbol, ex))
                        self._seen[symbol, ex] = ts
                        if self.recording and prev is not None and ts > prev:
                            lo = max(prev + 1, ts - 1000)
                            self.latencies.extend(now - s for s in range(ts, lo - 1, -STEP_MS))


def _stamps(payload: dict[str, Any]) -> list[tuple[str, int]]:
    """(key, exchange ms) of one symbol's payload: per exchange on ``ticks``; on ``bbo`` the
    newer of the best bid's and offer's quote times (the view changed by then)."""
    if "prices" in payload:
        return [(ex, p["timestamp_ms"]) for ex, p in payload["prices"].items()]
    sides = [payload.get("bid"), payload.get("ask")]
    stamps = [_ms(side["timestamp"]) for side in sides if side]
    return [("bbo", max(stamps))] if stamps else []


def _ms(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp).timestamp() * 1000 + 0.5)


class Crowd:
    """``n`` subscribers (``probes`` of them parsing) and one stuck client."""

    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port = port
        self.args = args
        self.subscribe = orjson.dumps({"op": "subscribe", "channels": [args.channel]})
        self.counters: list[Counter] = []
        self.probes = [Probe() for _ in range(args.probes)]
        self.tasks: list[asyncio.Task[None]] = []
        self.stuck: socket.socket | None = None
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Crowd:
        args = self.args
        self.counters = await connect_counters(
            self.port, args.subscribers - args.probes, self.subscribe
        )
        self.stuck = await asyncio.to_thread(stuck_client, self.port, self.subscribe)
        self.session = aiohttp.ClientSession()
        url = f"ws://127.0.0.1:{self.port}/stream"
        self.tasks = [asyncio.create_task(p.run(self.session, url, self.subscribe))
                      for p in self.probes]  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        for c in self.counters:
            if c.transport is not None:
                c.transport.close()
        if self.stuck is not None:
            self.stuck.close()

    def received(self) -> int:
        return sum(c.bytes for c in self.counters)


CPU_SHARES: dict[str, float] = {}  # phase -> the daemon's CPU share over it


async def rate(daemon: Daemon, seconds: float, phase: str) -> float:
    """Ticks/s over ``seconds``; the daemon's CPU share is kept in CPU_SHARES: below ~1.0
    the senders (sharing their core with the subscribers) did not saturate it."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    t0, n0, c0 = time.time(), await asyncio.to_thread(ticks, daemon), cpu_s(pid)
    await asyncio.sleep(seconds)
    t1, n1, c1 = time.time(), await asyncio.to_thread(ticks, daemon), cpu_s(pid)
    CPU_SHARES[phase] = (c1 - c0) / (t1 - t0)
    return (n1 - n0) / (t1 - t0)


async def run(daemon: Daemon, args: argparse.Namespace, hoses: list[Firehose]) -> dict[str, Any]:
    """Latency (paced), then ingest without, with, and again without subscribers."""
    out: dict[str, Any] = {}
    async with Crowd(daemon.port, args) as crowd:
        await asyncio.sleep(args.warmup)
        for p in crowd.probes:
            p.recording = True
        b0 = crowd.received()
        await asyncio.sleep(args.seconds)
        for p in crowd.probes:
            p.recording = False
        out["counted_bytes_per_s"] = (crowd.received() - b0) / args.seconds
        out["latencies"] = [x for p in crowd.probes for x in p.latencies]
        out["probe_frames"] = [p.frames for p in crowd.probes]
        out["stream_paced"] = (await asyncio.to_thread(daemon.get, "/health"))[1].get("stream")
    for h in hoses:  # the same ports: the daemon reconnects to the saturating senders
        h.stop()
    hoses[:] = [Firehose(args.pairs, 0, 0, h.port, quotes=args.channel == "bbo") for h in hoses]
    await asyncio.sleep(args.warmup)
    out["without_1"] = await rate(daemon, args.seconds, "without_1")
    async with Crowd(daemon.port, args):
        await asyncio.sleep(args.warmup)
        before = (await asyncio.to_thread(daemon.get, "/health"))[1].get("stream") or {}
        t0 = time.time()
        out["with"] = await rate(daemon, args.seconds, "with")
        out["stream"] = (await asyncio.to_thread(daemon.get, "/health"))[1].get("stream")
        spent_ms = (out["stream"] or {}).get("deliver_ms_total", 0) - before.get(
            "deliver_ms_total", 0
        )
        out["deliver_share"] = spent_ms / 1000 / (time.time() - t0)
    await asyncio.sleep(args.warmup)
    out["without_2"] = await rate(daemon, args.seconds, "without_2")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream")
    ap.add_argument("--subscribers", type=int, default=1000, help="including the probes")
    ap.add_argument("--probes", type=int, default=10, help="subscribers that parse frames")
    ap.add_argument("--channel", default="ticks", choices=["ticks", "bbo"])
    ap.add_argument("--sources", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--paced-rate", type=float, default=50_000, help="lines/s in all")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-buffered", type=int, default=16_384)
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    daemon_cpus = {cpus[0]} if len(cpus) > 1 else set(cpus)
    pin(0, set(cpus[1:]) or set(cpus))
    pairs = pair_names(args.pairs)
    with tempfile.TemporaryDirectory() as tmp_dir, PostgresServer() as pg, RedisServer() as rd:
        tmp = Path(tmp_dir)
        quotes = args.channel == "bbo"
        hoses = [Firehose(args.pairs, args.paced_rate / args.sources, 0, quotes=quotes)
                 for _ in range(args.sources)]  # fmt: skip
        config: dict[str, Any] = {
            "http": {"host": "127.0.0.1", "port": 0},
            "postgres": {"dsn": pg.dsn},
            "redis": {"url": rd.url},
            "embedded": {"data_dir": str(tmp / "var")},
            "capture": {"enabled": False, "port": free_port()},
            "log_level": "WARNING",
            "pairs": pairs,
            "stream": {
                "max_buffered_bytes": args.max_buffered,
                "heartbeat_s": 3600.0,
                "max_connections": args.subscribers + 10,
            },
            "exchanges": [{"name": f"ex{i + 1}", "port": h.port} for i, h in enumerate(hoses)],
        }
        daemon = Daemon(tmp, config)
        daemon.start()
        assert daemon.proc is not None
        pin(daemon.proc.pid, daemon_cpus)
        try:
            time.sleep(args.warmup)
            m = asyncio.run(run(daemon, args, hoses))
            for h in hoses:
                h.stop()
            settle(daemon)
        finally:
            daemon.stop()
            for h in hoses:
                if h.proc.poll() is None:
                    h.stop()
    lat = m["latencies"]
    stream = m["stream"] or {}
    without_rate = (m["without_1"] + m["without_2"]) / 2
    with_rate = m["with"]
    result = {
        "channel": args.channel,
        "subscribers": args.subscribers,
        "stuck_clients": 1,
        "ticks_per_s_without": [round(m["without_1"]), round(m["without_2"])],
        "ticks_per_s_with": round(with_rate),
        "ratio": round(with_rate / without_rate, 3) if without_rate else None,
        "latency_p50_ms": round(percentile(lat, 0.50), 1),
        "latency_p99_ms": round(percentile(lat, 0.99), 1),
        "latency_samples": len(lat),
        "paced_rate": args.paced_rate,
        "counted_mb_per_s": round(m["counted_bytes_per_s"] / 1e6, 2),
        "stream_paced": m["stream_paced"],
        "stream": stream,
        "daemon_cpus": sorted(daemon_cpus),
        "daemon_cpu_share": {k: round(v, 3) for k, v in CPU_SHARES.items()},
        "deliver_share_of_core": round(m["deliver_share"], 3),
    }
    if args.channel == "bbo" and not any(m["probe_frames"]):
        print("bbo: no update reached a subscriber: the world view is not wired yet (use ticks)")
    if args.channel == "ticks":
        print("channel ticks (the world view that drives bbo is not wired on this branch yet)")
    print(
        f"ingest, saturating senders: {m['without_1']:,.0f} and {m['without_2']:,.0f} ticks/s "
        f"without subscribers (before, after), {with_rate:,.0f} with {args.subscribers:,} "
        "+ 1 stuck "
        f"(ratio {result['ratio']}; CPU {sorted(daemon_cpus)} for the daemon)"
    )
    shares = ", ".join(f"{k} {v:.0%}" for k, v in CPU_SHARES.items())
    print(f"daemon CPU share per phase: {shares} (below ~100%: the senders did not saturate it)")
    print(
        f"stream delivery rounds took {m['deliver_share']:.1%} of the daemon's core with "
        f"subscribers (the hub's own clock: what ingest gives up, without the run-to-run noise "
        f"of the rates above; plus the senders of clients that fell behind)"
    )
    print(
        f"change -> client at {args.paced_rate:,.0f} ticks/s: p50 {result['latency_p50_ms']} ms "
        f"p99 {result['latency_p99_ms']} ms ({len(lat):,} samples from {args.probes} probes)"
    )
    print(
        "stuck client (one per phase): slow_closed "
        f"{(m['stream_paced'] or {}).get('slow_closed')} while paced, "
        f"{stream.get('slow_closed')} while saturated; conflated "
        f"{stream.get('conflated')}; frames sent {stream.get('frames_sent')}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
