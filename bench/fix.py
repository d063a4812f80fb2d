"""FIX capture throughput: N NewOrderSingle messages over C connections into real PostgreSQL.

    python -m bench.fix [--messages N=100000] [--clients C=20] [--profile]

Starts a throwaway PostgreSQL (tests.harness.services.PostgresServer) and, in this process, the
capture listener, service and PostgreSQL store on uvloop. The senders run in a separate process
(pre-encoded messages, sent once this side says go) so the measured core is the listener's.
The clock stops when every message is committed to PostgreSQL; the row count is checked after.
Human lines first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time

import uvloop

from marketflow.adapters.capture_postgres import PostgresCaptureStore
from marketflow.adapters.fix.capture_decoder import FixCaptureDecoder
from marketflow.adapters.fix.capture_listener import CaptureListener
from marketflow.adapters.fix.codec import encode
from marketflow.app.capture import CaptureService
from marketflow.settings import CaptureSettings, PostgresSettings
from tests.harness.services import PostgresServer


def _payload(client: int, count: int) -> bytes:
    return b"".join(
        encode(
            "D",
            [
                (11, f"ORD{seq:09d}"),
                (21, 1),
                (55, ("AAPL", "MSFT", "TSLA")[seq % 3]),
                (54, 1 + seq % 2),
                (60, "20261126-11:45:30.123"),
                (38, 100),
                (40, 2),
                (44, "187.25"),
                (59, 0),
            ],
            begin="FIX.4.2",
            sender=f"CLIENT{client:02d}",
            target="MARKETFLOW",
            seq=seq,
            sending_time="20261126-11:45:30.123",
        )
        for seq in range(1, count + 1)
    )


async def _send(port: int, messages: int, clients: int) -> None:
    """Sender process: encode everything, say ready, wait for go, send over C connections."""
    counts = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
    payloads = [_payload(i, n) for i, n in enumerate(counts)]
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    async def one(data: bytes, writer: asyncio.StreamWriter) -> None:
        for i in range(0, len(data), 65536):
            writer.write(data[i : i + 65536])
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(one(p, w) for p, (_, w) in zip(payloads, conns, strict=True)))
    print("sent", flush=True)


async def _run(messages: int, clients: int, profile: bool) -> dict[str, object]:
    with PostgresServer() as server:
        server.start()
        settings = CaptureSettings(port=0)
        store = await PostgresCaptureStore.open(PostgresSettings(dsn=server.dsn))
        service = CaptureService(store, settings, FixCaptureDecoder())
        async with store, service, CaptureListener(service, settings) as listener:
            sender = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.fix", "--sender", str(listener.port),
                "--messages", str(messages), "--clients", str(clients),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert sender.stdin is not None
            assert sender.stdout is not None
            line = await sender.stdout.readline()
            assert line.strip() == b"ready", line
            profiler = cProfile.Profile() if profile else None
            start = time.perf_counter()
            cpu_start = time.process_time()
            if profiler:
                profiler.enable()
            sender.stdin.write(b"go\n")
            await sender.stdin.drain()
            # Polling a counter every 5 ms costs nothing next to the work being measured.
            while service.stored < messages:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            if profiler:
                profiler.disable()
            await sender.wait()
            stored, rejects = await store.count()
            stats = service.stats()
        if profiler:
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    rate = stored / elapsed
    print(f"messages sent:     {messages} over {clients} connections")
    print(f"rows in fix_messages: {stored}, fix_rejects: {rejects}")
    print(f"elapsed:           {elapsed:.3f} s (listener process CPU {cpu:.3f} s)")
    print(f"stored rate:       {rate:,.0f} msgs/s ({messages / cpu:,.0f} per CPU second)")
    print(f"bytes received:    {stats['bytes']:,}")
    return {
        "msgs_per_s": round(rate),
        "clients": clients,
        "messages": messages,
        "stored": stored,
        "rejected": rejects,
        "elapsed_s": round(elapsed, 3),
        "cpu_s": round(cpu, 3),
        "msgs_per_cpu_s": round(messages / cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="cProfile the listener side")
    parser.add_argument("--sender", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.messages < 1 or args.clients < 1:
        parser.error("--messages and --clients must be positive")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.sender:
            runner.run(_send(args.sender, args.messages, args.clients))
            return
        result = runner.run(_run(args.messages, args.clients, args.profile))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
