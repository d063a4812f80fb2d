"""A bench-only JSON-lines exchange that can outrun the daemon: pre-rendered lines, restamped.

    python -m bench.firehose --port P [--pairs 5] [--rate 0] [--fill-s 0] [--quotes]

The simulator (``marketflow.simulator``) walks prices in Python, about 1 us a line: on a
2-core machine it cannot feed a daemon that takes less. This sender renders 300,000
reference-format lines once, with a 13-digit placeholder for the timestamp, and sends them
in blocks restamped with the wall clock (one ``bytes.replace`` per block), so it costs tens of
nanoseconds a line. ``--rate 0`` sends as fast as the daemon reads (TCP flow control is the
throttle); ``--rate R`` paces R lines/s in 1 ms slices, each stamped when it is sent.

``--fill-s N`` first sends one round per second of exchange time for the last N seconds
(the window retention), so memory can be measured with every retained second present.
Serves one client at a time, forever; prints ``listening PORT`` once bound.
"""

from __future__ import annotations

import argparse
import random
import socket
import time

PLACEHOLDER = b"@@@@@@@@@@@@@"  # 13 digits: epoch milliseconds until 2286
LINES = 300_000  # rendered once per sender (~20 MB), cycled


def pair_names(pairs: int, prefix: str = "P") -> list[str]:
    """The daemon's configured symbols: the five defaults, then synthetic ones."""
    defaults = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]
    if pairs <= len(defaults):
        return defaults[:pairs]
    return [*defaults, *(f"{prefix}{i:04d}USDT" for i in range(pairs - len(defaults)))]


def render(pairs: list[str], rounds: int, rng: random.Random, quotes: bool = False) -> list[bytes]:
    """``rounds`` rounds (one line per pair each), each round one bytes with the placeholder;
    ``quotes``: each line also carries a best bid and ask around the price (the world view's
    input, for ``bench.stream --channel bbo``)."""
    prices = {p: rng.uniform(1, 100_000) for p in pairs}
    out = []
    for _ in range(rounds):
        lines = []
        for p in pairs:
            prices[p] *= 1 + rng.uniform(-0.001, 0.001)
            price = prices[p]
            quote = b""
            if quotes:
                half = price * rng.uniform(0.00001, 0.0002)
                quote = b',"bid":%r,"ask":%r' % (price - half, price + half)
            lines.append(b'{"symbol":"%s","price":%r,"timestamp":%s%s}\n' % (
                p.encode(), price, PLACEHOLDER, quote))  # fmt: skip
        out.append(b"".join(lines))
    return out


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def stamp(block: bytes, ts: int) -> bytes:
    return block.replace(PLACEHOLDER, b"%d" % ts)


def serve(conn: socket.socket, rounds: list[bytes], pairs: int, rate: float, fill_s: int) -> None:
    if fill_s:
        start = now_ms() - fill_s * 1000
        for k in range(fill_s):
            conn.sendall(stamp(rounds[k % len(rounds)], start + k * 1000))
    # Blocks of whole rounds, ~64 KiB each, cycled.
    per_block = max(1, 65536 // len(rounds[0]))
    blocks = [
        b"".join(rounds[i : i + per_block]) for i in range(0, len(rounds) - per_block, per_block)
    ]
    if rate <= 0:
        k = 0
        while True:
            conn.sendall(stamp(blocks[k % len(blocks)], now_ms()))
            k += 1
    rounds_per_ms = rate / pairs / 1000
    t0 = time.monotonic()
    sent = 0.0  # rounds sent
    k = 0
    while True:
        due = int((time.monotonic() - t0) * 1000 * rounds_per_ms - sent)
        if due > 0:
            due = min(due, len(rounds))
            chunk = b"".join(rounds[(k + i) % len(rounds)] for i in range(due))
            conn.sendall(stamp(chunk, now_ms()))
            k += due
            sent += due
        time.sleep(0.0005)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.firehose")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--rate", type=float, default=0.0, help="lines/s; 0: as fast as read")
    ap.add_argument("--fill-s", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quotes", action="store_true", help="lines carry a bid and an ask too")
    args = ap.parse_args(argv)
    pairs = pair_names(args.pairs)
    rounds = render(pairs, max(64, LINES // args.pairs), random.Random(args.seed), args.quotes)
    with socket.create_server(("127.0.0.1", args.port)) as server:
        print(f"listening {args.port}", flush=True)
        while True:
            conn, _ = server.accept()
            # As asyncio does for every TCP transport (the simulator's too): without it Nagle
            # holds a paced sender's small writes back until the daemon's delayed ACK (40 ms).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                try:
                    serve(conn, rounds, args.pairs, args.rate, args.fill_s)
                except (BrokenPipeError, ConnectionResetError):
                    continue


if __name__ == "__main__":
    raise SystemExit(main())
