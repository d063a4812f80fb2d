"""FIX capture throughput: N NewOrderSingle messages over C connections into real PostgreSQL,
beside PostgreSQL's own COPY ceiling for the same rows, measured in the same run.

    python -m bench.fix [--messages N=100000] [--clients C=20] [--runs R=1] [--no-pin] [--profile]

Starts a throwaway PostgreSQL with its default settings (tests.harness.services.PostgresServer,
durable: fsync, synchronous_commit and full_page_writes on; a logged table) and, in this
process, the capture listener, service and PostgreSQL store on uvloop. The senders run in a
separate process (pre-encoded messages, sent once this side says go) so the measured core is
the listener's. On a machine with two or more CPUs the listener is pinned to CPU 0 and
PostgreSQL and the senders to CPU 1 (os.sched_setaffinity; ``--no-pin`` leaves scheduling to
the kernel), so the figures read "what one core of listener does".

Stored rate: the clock starts when the senders are told to go and stops when the store has
committed the last message (CaptureService.stored counts rows only after their COPY returned);
the row count in the database is checked after.

Ceiling: the same messages, decoded beforehand and turned into the very rows the store writes
(postgres_store.message_records), copied from memory with asyncpg ``copy_records_to_table``
into the same table with the same indexes, one batch after the other in the batch sizes the
daemon's store wrote, no daemon involved. Every measurement starts from a fresh table
(TRUNCATE, then CHECKPOINT). The ceiling is taken right before (in the previous run's batch
sizes) and right after each daemon run, and the ratio is stored / their mean, so that the
machine's other load, which drifts, weighs on both sides alike. A first daemon run is not
reported (warm-up). Also reported: the sender-side rate (messages / time the senders took to
hand everything to the kernel), the figure FixFeeder's stress test publishes; CPU per message
of the listener and of PostgreSQL. Human lines first, a Markdown table of the ranges over the
runs, and last one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.fix_ceiling import ceiling as copy_ceiling
from bench.fix_ceiling import ceiling_rows, cpu_s, family, fresh_table
from marketflow.adapters.capture.decoder import FixCaptureDecoder
from marketflow.adapters.capture.listener import CaptureListener
from marketflow.adapters.capture.postgres_store import (
    PostgresCaptureStore,
)
from marketflow.adapters.fix.codec import encode
from marketflow.adapters.fix.dictionary import FixDictionary
from marketflow.adapters.postgres.database import Database, open_database
from marketflow.app.capture import CaptureService
from marketflow.domain.capture import CapturedMessage, CaptureReject
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


class _RecordingStore(PostgresCaptureStore):
    """The daemon's store, noting the size of every batch it writes (the ceiling copies the
    same sizes)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, owns_db=True)
        self.batches: list[int] = []
        self.busy_s = 0.0  # time inside write(): encoding the COPY, then waiting for it

    async def write(
        self, messages: Sequence[CapturedMessage], rejects: Sequence[CaptureReject]
    ) -> list[CaptureReject]:
        self.batches.append(len(messages))
        start = time.perf_counter()
        try:
            return await super().write(messages, rejects)
        finally:
            self.busy_s += time.perf_counter() - start


@dataclass(frozen=True, slots=True)
class _Daemon:
    """What one daemon run measured."""

    stored: int
    elapsed_s: float
    cpu_s: float
    pg_cpu_s: float
    handed_s: float
    delivered_s: float
    cpu_busy: list[float]
    batches: list[int]
    store_busy_s: float


async def _daemon(
    dsn: str, postmaster: int, messages: int, clients: int, profile: bool, pin: bool
) -> _Daemon:
    """One run of listener + service + store against the sender process."""
    settings = CaptureSettings(port=0)
    store = _RecordingStore(await open_database(PostgresSettings(dsn=dsn)))  # migrates
    await fresh_table(dsn)
    service = CaptureService(store, settings, FixCaptureDecoder(), FixDictionary())
    async with store, service, CaptureListener(service, settings) as listener:
        if pin:
            _pin(1)  # the sender process inherits CPU 1 (PostgreSQL's)
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
        profiler = cProfile.Profile() if profile else None
        pg_pids = family(postmaster)  # the pool's backends are open by now
        pg_start = cpu_s(pg_pids)
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
        pg_cpu = cpu_s(pg_pids) - pg_start
        cpu_busy = [
            (b1 - b0) / ((t1 - t0) or 1)
            for (b0, t0), (b1, t1) in zip(machine_start, _machine_cpu(), strict=True)
        ]
        if profiler:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        sent = (await sender.stdout.readline()).split()
        assert sent[:1] == [b"sent"], sent
        handed_s, delivered_s, sender_cpu = map(float, sent[1:])
        await sender.wait()
        stored, rejects = await store.count()
    assert (stored, rejects) == (messages, 0), (stored, rejects)
    del sender_cpu
    return _Daemon(
        stored, elapsed, cpu, pg_cpu, handed_s, delivered_s, cpu_busy, store.batches, store.busy_s
    )


async def _run(
    messages: int, clients: int, runs: int, profile: bool, pin: bool
) -> dict[str, object]:
    pin = pin and len(os.sched_getaffinity(0)) >= 2
    if pin:
        _pin(1)  # PostgreSQL inherits CPU 1; the listener and the ceiling's client run on 0
    pinning = "listener on CPU 0, PostgreSQL + senders on CPU 1" if pin else "not pinned"
    print(f"{messages} NewOrderSingle over {clients} connections, {runs} run(s), {pinning}")
    print("PostgreSQL with its default settings (fsync, synchronous_commit, full_page_writes on)")
    counts = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
    rows = ceiling_rows([_payload(i, n) for i, n in enumerate(counts)])
    results: list[dict[str, object]] = []
    stored: list[int] = []
    ceilings: list[int] = []
    ratios: list[float] = []
    senders: list[int] = []
    with PostgresServer(durable=True) as server:
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        if pin:
            _pin(0)
        # A first daemon run, not reported, warms up both sides and gives the batch sizes of
        # the first ceiling.
        batches = (await _daemon(server.dsn, postmaster, messages, clients, False, pin)).batches
        for run in range(1, runs + 1):
            # The ceiling is measured right before (in the previous run's batch sizes) and right
            # after the daemon (in its own), and the ratio taken to their mean: the machine's
            # other load drifts, the bracket follows it.
            before = await copy_ceiling(server.dsn, rows, batches, postmaster)
            d = await _daemon(server.dsn, postmaster, messages, clients, profile, pin)
            batches = d.batches
            after = await copy_ceiling(server.dsn, rows, batches, postmaster)
            ceiling = (before[0] + after[0]) / 2
            c_pg_cpu = (before[1] + after[1]) / 2
            c_cpu = (before[2] + after[2]) / 2
            rate = messages / d.elapsed_s
            one: dict[str, object] = {
                "run": run,
                "stored_msgs_per_s": round(rate),
                "ceiling_rows_per_s": round(ceiling),
                "ceiling_before_after": [round(before[0]), round(after[0])],
                "ratio": round(rate / ceiling, 3),
                "sender_handoff_msgs_per_s": round(messages / d.handed_s),
                "sender_delivered_msgs_per_s": round(messages / d.delivered_s),
                "listener_us_per_msg": round(1e6 * d.cpu_s / messages, 2),
                "postgres_us_per_row": round(1e6 * d.pg_cpu_s / messages, 2),
                "ceiling_postgres_us_per_row": round(1e6 * c_pg_cpu / messages, 2),
                "ceiling_client_us_per_row": round(1e6 * c_cpu / messages, 2),
                "batches": len(d.batches),
                "store_busy": round(d.store_busy_s / d.elapsed_s, 2),
                "cpu_busy": [round(b, 2) for b in d.cpu_busy],
            }
            results.append(one)
            stored.append(round(rate))
            ceilings.append(round(ceiling))
            ratios.append(rate / ceiling)
            senders.append(round(messages / d.handed_s))
            print(
                f"run {run}: stored {rate:,.0f} msgs/s | COPY ceiling {ceiling:,.0f} rows/s"
                f" (before {before[0]:,.0f}, after {after[0]:,.0f}) | ratio {rate / ceiling:.2f}"
                f" | sender side {senders[-1]:,} msgs/s"
                f" | listener {one['listener_us_per_msg']} us/msg | PostgreSQL"
                f" {one['postgres_us_per_row']} us/row, ceiling"
                f" {one['ceiling_postgres_us_per_row']} | {len(d.batches)} batches, store busy"
                f" {one['store_busy']:.0%}"
                f" | cpu busy {one['cpu_busy']}"
            )
    print("| measure | min | median | max |")
    print("|---|---|---|---|")
    for name, values, form in (
        ("stored (committed, counted back) msgs/s", stored, ",.0f"),
        ("PostgreSQL COPY ceiling, same run, rows/s", ceilings, ",.0f"),
        ("ratio stored / ceiling", ratios, ".2f"),
        ("sender side (FixFeeder's shape) msgs/s", senders, ",.0f"),
    ):
        low, mid, high = min(values), statistics.median(values), max(values)
        print(f"| {name} | {low:{form}} | {mid:{form}} | {high:{form}} |")
    return {
        "messages": messages,
        "clients": clients,
        "pinned": pin,
        "stored_msgs_per_s": stored,
        "ceiling_rows_per_s": ceilings,
        "ratio": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "sender_handoff_msgs_per_s": senders,
        "runs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1, help="measurements in one server")
    parser.add_argument("--profile", action="store_true", help="cProfile the listener side")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin processes to CPUs"
    )
    parser.add_argument("--sender", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.messages < 1 or args.clients < 1 or args.runs < 1:
        parser.error("--messages and --clients must be positive")
    tune_gc()  # as the daemon does (marketflow.startup)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.sender:
            runner.run(_send(args.sender, args.messages, args.clients))
            return
        result = runner.run(_run(args.messages, args.clients, args.runs, args.profile, args.pin))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
