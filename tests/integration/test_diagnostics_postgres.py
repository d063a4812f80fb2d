"""Pipeline diagnostics on a real PostgreSQL (harness server): the writer, on an injected
clock, writes one pipeline_stats row per minute, and GET /diagnostics reads them back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from marketflow.adapters.postgres.database import Database, open_database
from marketflow.adapters.postgres.pipeline_stats import PostgresPipelineStats
from marketflow.app.diagnostics import DiagnosticsWriter, Totals, build_row, read_totals
from marketflow.bootstrap import Daemon, wall_clock_ms
from marketflow.domain.feeds import FeedStatus
from marketflow.entrypoints.http_common import new_app
from marketflow.entrypoints.http_diagnostics import add_diagnostics_routes
from marketflow.settings import PostgresSettings, Settings

pytestmark = pytest.mark.integration

M0 = 1_700_000_040_000  # a minute start (Unix ms): 2023-11-14T22:14:00Z
MINUTES = 3


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Database]:
    opened = await open_database(PostgresSettings(dsn=pg_dsn))
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_writer_writes_a_row_per_minute_and_the_api_reads_them(db: Database) -> None:
    store = PostgresPipelineStats(db)
    now = [M0 + 5_000]
    feed = FeedStatus("exchange1", "json")
    minutes_run = asyncio.Event()

    async def sleep(seconds: float) -> None:
        """Each "minute": 100 ticks arrive (one rejected line), then the clock reaches the
        boundary the writer waits for; after MINUTES of them, nothing more happens."""
        if feed.reconnects >= MINUTES:
            minutes_run.set()
            await asyncio.Event().wait()
        feed.ticks += 100
        feed.reconnects += 1
        feed.rejects.counts["bad_json"] = feed.rejects.counts.get("bad_json", 0) + 1
        now[0] += int(seconds * 1000)

    def totals() -> Totals:
        return read_totals([feed], feed.ticks)

    writer = DiagnosticsWriter(store, "node-a", "all", totals, lambda: {"fanin": 0},
                               lambda: [0.003, 0.001], lambda: now[0], sleep=sleep)  # fmt: skip
    await writer.start()
    try:
        async with asyncio.timeout(20):
            await minutes_run.wait()
    finally:
        await writer.aclose()

    app = new_app()
    add_diagnostics_routes(app, store)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/diagnostics", params={"node": "node-a", "limit": "10"})
        body = await resp.json()
        since = await client.get("/diagnostics", params={"since": str(M0 + 60_000)})
        since_body = await since.json()
        other = await (await client.get("/diagnostics", params={"node": "node-b"})).json()

    assert resp.status == 200
    assert [r["minute"] for r in body["rows"]] == [
        "2023-11-14T22:16:00.000Z", "2023-11-14T22:15:00.000Z", "2023-11-14T22:14:00.000Z",
    ]  # fmt: skip
    for row in body["rows"]:
        assert (row["node"], row["role"], row["ticks_in"], row["ticks_out"]) == (
            "node-a", "all", 100, 100)  # fmt: skip
        assert (row["reconnects"], row["rejects"], row["queue_depths"]) == (
            1, {"bad_json": 1}, {"fanin": 0})  # fmt: skip
        assert row["write_latency_ms"] == {"n": 2, "p50": 3.0, "p99": 3.0}
        assert row["lag_by_partition"] == {}
    assert len(since_body["rows"]) == 2
    assert other == {"rows": [], "stored": True}


async def test_a_rewritten_minute_is_one_row_and_the_maps_round_trip(db: Database) -> None:
    store = PostgresPipelineStats(db)
    totals = read_totals([FeedStatus("exchange1", "json", ticks=5)], 5)
    row = build_row("node-a", "aggregate", M0, totals, Totals(), lag_by_partition={"t:1": 4},
                    queue_depths={"fanin": 1, "exchange1": 2},
                    write_durations_s=[0.25])  # fmt: skip

    await store.write_stats([row])
    await store.write_stats([row])

    assert await store.read_stats("node-a", M0, 10) == [row]
    assert await store.read_stats("node-a", M0 + 60_000, 10) == []


async def test_the_daemon_on_postgres_writes_its_node_row_and_serves_it(
    pg_dsn: str, tmp_path: Path
) -> None:
    settings = Settings(
        http={"host": "127.0.0.1", "port": 0},
        postgres={"dsn": pg_dsn},
        redis={"url": ""},
        embedded={"data_dir": str(tmp_path)},
        capture={"enabled": False},
        node={"id": "node-x"},
        mode="test",
    )
    # Not across a minute boundary: there the daemon's own writer makes the due row too,
    # and a write of it in flight would ride along with ours (two rows, not the one asked).
    to_boundary = 60 - time.time() % 60
    if to_boundary < 25:
        await asyncio.sleep(to_boundary + 0.5)
    daemon = Daemon(settings)
    await daemon.start()
    try:
        writer = daemon.diagnostics
        assert writer is not None
        deadline = time.monotonic() + 20
        while daemon.aggregator.ticks_folded == 0:  # the generator's first ticks
            assert time.monotonic() < deadline, "no ticks from the test-mode generator"
            await asyncio.sleep(0.05)
        # The next minute, without waiting for it: the writer's clock runs a minute ahead.
        writer._clock = lambda: wall_clock_ms() + 60_000
        assert await writer.write_due() == 1
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{daemon.http_port}/diagnostics?node=node-x"
            async with http.get(url) as resp:
                status, body = resp.status, await resp.json()
            async with http.get(f"http://127.0.0.1:{daemon.http_port}/health") as resp:
                health = (await resp.json())["diagnostics"]
    finally:
        await daemon.stop()

    assert status == 200
    (row,) = body["rows"]
    assert (row["node"], row["role"]) == ("node-x", "all")
    assert row["ticks_in"] > 0
    assert row["ticks_out"] > 0
    assert "fanin" in row["queue_depths"]
    assert health == {"node": "node-x", "role": "all", "rows_written": 1, "rows_pending": 0,
                      "rows_dropped": 0, "last_error": None}  # fmt: skip
