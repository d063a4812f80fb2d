"""bench.fix's other half: PostgreSQL's own COPY ceiling for the bench's rows (no daemon
involved), and the CPU time of PostgreSQL's processes."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import asyncpg

from marketflow.adapters.capture.decoder import FixCaptureDecoder
from marketflow.adapters.capture.postgres_store import MESSAGE_COLUMNS, message_records
from marketflow.adapters.fix.codec import FixFramer


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of the processes still alive among ``pids``."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def family(root: int) -> list[int]:
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


async def fresh_table(dsn: str) -> None:
    """Empty fix_messages (a new relation, indexes included) and checkpoint, so that each
    measurement starts from the same table state."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE fix_messages, fix_rejects RESTART IDENTITY")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def ceiling_rows(payloads: list[bytes]) -> list[tuple[object, ...]]:
    """The bench's messages (one payload per client), decoded and turned into the rows the
    store writes, interleaved across clients as the listener receives them."""
    decoder = FixCaptureDecoder()
    received_ms = time.time_ns() // 1_000_000
    per_client = []
    for i, payload in enumerate(payloads):
        frames = FixFramer().feed(payload)
        per_client.append(
            [decoder.decode(f, received_ms, f"127.0.0.1:{40000 + i}") for f in frames]  # type: ignore[arg-type]
        )
    interleaved = [m for group in itertools.zip_longest(*per_client) for m in group if m]
    return message_records(interleaved)


async def ceiling(
    dsn: str, rows: list[tuple[object, ...]], batches: list[int], postmaster: int
) -> tuple[float, float, float]:
    """PostgreSQL's own rate for these rows: COPY from memory (asyncpg copy_records_to_table)
    in the daemon's batch sizes, one batch after the other, into the fresh table. Returns
    (rows/s, PostgreSQL CPU s, client CPU s)."""
    await fresh_table(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        pg_pids = family(postmaster)
        pg_start = cpu_s(pg_pids)
        cpu_start = time.process_time()
        start = time.perf_counter()
        at = 0
        for n in batches:
            await conn.copy_records_to_table(
                "fix_messages", records=rows[at : at + n], columns=MESSAGE_COLUMNS
            )
            at += n
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        pg_cpu = cpu_s(pg_pids) - pg_start
        copied = await conn.fetchval("SELECT count(*) FROM fix_messages")
    finally:
        await conn.close()
    assert copied == len(rows) == at, (copied, len(rows), at)
    return len(rows) / elapsed, pg_cpu, cpu
