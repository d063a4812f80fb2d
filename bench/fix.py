"""FIX capture throughput: N NewOrderSingle messages over C connections into real PostgreSQL.

    python -m bench.fix [--messages N=100000] [--clients C=20] [--no-pin] [--profile]

Starts a throwaway PostgreSQL (tests.harness.services.PostgresServer) and, in this process, the
capture listener, service and PostgreSQL store on uvloop. The senders run in a separate process
(pre-encoded messages, sent once this side says go) so the measured core is the listener's.
On a machine with two or more CPUs the listener is pinned to CPU 0 and PostgreSQL and the
senders to CPU 1 (os.sched_setaffinity; ``--no-pin`` leaves scheduling to the kernel), so the
figures read "what one core of listener does" and do not depend on where the kernel put whom.

The clock starts when the senders are told to go and stops when the store has committed the
last message (CaptureService.stored counts rows only after their COPY returned, outside any
open transaction); the row count in the database is checked after. Reported: the stored rate;
the listener's CPU time per message; PostgreSQL's (postmaster and its children) CPU time per
row; and the sender-side rate (messages / time the senders took to hand everything to the
kernel and close), the figure a stress-test tool such as FixFeeder's reports.
Human lines first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

import uvloop

from marketflow.adapters.capture.decoder import FixCaptureDecoder
from marketflow.adapters.capture.listener import CaptureListener
from marketflow.adapters.capture.postgres_store import PostgresCaptureStore
from marketflow.adapters.fix.codec import encode
from marketflow.adapters.fix.dictionary import FixDictionary
from marketflow.app.capture import CaptureService
from marketflow.settings import CaptureSettings, PostgresSettings
from marketflow.startup import tune_gc
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
    start = time.perf_counter()
    cpu_start = time.process_time()

    handed_over: list[float] = []

    async def one(data: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(0, len(data), 65536):
            writer.write(data[i : i + 65536])
            await writer.drain()
        handed_over.append(time.perf_counter())
        writer.write_eof()
        await reader.read()  # EOF: the listener has read everything and closed its side
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(one(p, r, w) for p, (r, w) in zip(payloads, conns, strict=True)))
    done = time.perf_counter()
    print(
        f"sent {max(handed_over) - start:.6f} {done - start:.6f}"
        f" {time.process_time() - cpu_start:.6f}",
        flush=True,
    )


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of the processes still alive among ``pids``."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _family(root: int) -> list[int]:
    """``root`` and its direct children (the postmaster and its backends and workers)."""
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == root:
                pids.append(int(entry.name))
    return pids


def _machine_cpu() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat: other users of the machine show here."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = list(map(int, values))
            idle = ticks[3] + ticks[4]
            out.append((sum(ticks[:8]) - idle, sum(ticks[:8])))
    return out


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


async def _run(messages: int, clients: int, profile: bool, pin: bool) -> dict[str, object]:
    pin = pin and len(os.sched_getaffinity(0)) >= 2
    if pin:
        _pin(1)  # PostgreSQL and the sender process inherit CPU 1; the listener moves to 0
    with PostgresServer() as server:
        server.start()
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        settings = CaptureSettings(port=0)
        store = await PostgresCaptureStore.open(PostgresSettings(dsn=server.dsn))
        service = CaptureService(store, settings, FixCaptureDecoder(), FixDictionary())
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
            if pin:
                _pin(0)
            pg_pids = _family(postmaster)
            profiler = cProfile.Profile() if profile else None
            pg_start = _cpu_s(pg_pids)
            machine_start = _machine_cpu()
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
            pg_cpu = _cpu_s(pg_pids) - pg_start
            cpu_busy = [
                (b1 - b0) / ((t1 - t0) or 1)
                for (b0, t0), (b1, t1) in zip(machine_start, _machine_cpu(), strict=True)
            ]
            if profiler:
                profiler.disable()
            sent = (await sender.stdout.readline()).split()
            assert sent[:1] == [b"sent"], sent
            handed_s, delivered_s, sender_cpu = map(float, sent[1:])
            await sender.wait()
            stored, rejects = await store.count()
            stats = service.stats()
        if profiler:
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    rate = stored / elapsed
    pinning = "listener on CPU 0, PostgreSQL + senders on CPU 1" if pin else "not pinned"
    print(f"messages sent:     {messages} over {clients} connections ({pinning})")
    print(f"rows in fix_messages: {stored}, fix_rejects: {rejects}")
    print(f"elapsed:           {elapsed:.3f} s, go to last row committed")
    print(f"stored rate:       {rate:,.0f} msgs/s")
    print(f"listener CPU:      {cpu:.3f} s = {1e6 * cpu / messages:.1f} us/msg")
    print(f"PostgreSQL CPU:    {pg_cpu:.3f} s = {1e6 * pg_cpu / messages:.1f} us/row")
    print(f"sender side:       {messages / handed_s:,.0f} msgs/s handed to the kernel (socket")
    print(f"                   buffers), {messages / delivered_s:,.0f} msgs/s read by the listener")
    print(f"sender CPU:        {sender_cpu:.3f} s while sending (on PostgreSQL's CPU when pinned)")
    print("CPU busy (all processes, this run's share of the machine):")
    for name, busy in zip(("cpu0", "cpu1"), cpu_busy, strict=False):
        print(f"                   {name} {100 * busy:.0f}%")
    print(f"bytes received:    {stats['bytes']:,}")
    return {
        "msgs_per_s": round(rate),
        "clients": clients,
        "messages": messages,
        "stored": stored,
        "rejected": rejects,
        "pinned": pin,
        "elapsed_s": round(elapsed, 3),
        "cpu_s": round(cpu, 3),
        "msgs_per_cpu_s": round(messages / cpu),
        "listener_us_per_msg": round(1e6 * cpu / messages, 2),
        "postgres_us_per_row": round(1e6 * pg_cpu / messages, 2),
        "sender_handoff_msgs_per_s": round(messages / handed_s),
        "sender_delivered_msgs_per_s": round(messages / delivered_s),
        "sender_cpu_s": round(sender_cpu, 3),
        "cpu_busy": [round(b, 2) for b in cpu_busy],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="cProfile the listener side")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin processes to CPUs"
    )
    parser.add_argument("--sender", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.messages < 1 or args.clients < 1:
        parser.error("--messages and --clients must be positive")
    tune_gc()  # as the daemon does (marketflow.startup)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.sender:
            runner.run(_send(args.sender, args.messages, args.clients))
            return
        result = runner.run(_run(args.messages, args.clients, args.profile, args.pin))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
