"""The once-a-minute diagnostics row: what it counts (deltas of the pipeline's own counters),
when it is made (each minute boundary of the injected clock) and what a store outage does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from marketflow.app.diagnostics import DiagnosticsWriter, Totals, build_row, read_totals
from marketflow.domain.diagnostics import PipelineStatsRow
from marketflow.domain.errors import StoreUnavailable
from marketflow.domain.feeds import FeedStatus
from marketflow.entrypoints.http_common import new_app
from marketflow.entrypoints.http_diagnostics import add_diagnostics_routes

M0 = 1_700_000_040_000  # a minute start (Unix ms)


def status(name: str, ticks: int, reconnects: int = 0, **rejects: int) -> FeedStatus:
    st = FeedStatus(name, "json", ticks=ticks, reconnects=reconnects)
    for reason, n in rejects.items():
        st.rejects.counts[reason] = n
    return st


def test_row_holds_what_grew_in_the_minute_not_the_running_totals() -> None:
    before = read_totals([status("ex1", 100, 1, bad_json=2), status("ex2", 50)], 140)
    now = read_totals([status("ex1", 160, 3, bad_json=5, bad_price=1),
                       status("ex2", 90, 0, bad_json=1)], 240)  # fmt: skip

    row = build_row("node-a", "all", M0 + 1234, now, before,
                    write_durations_s=[0.004, 0.002, 0.010, 0.003],
                    queue_depths={"fanin": 2, "ex1": 0}, lag_by_partition={"ticks:0": 7},
                    written_ms=M0 + 60_050)  # fmt: skip

    assert row == PipelineStatsRow(
        node_id="node-a", role="all", minute_ms=M0, ticks_in=100, ticks_out=100, reconnects=2,
        rejects={"bad_json": 4, "bad_price": 1}, lag_by_partition={"ticks:0": 7},
        queue_depths={"fanin": 2, "ex1": 0}, write_count=4, write_p50_ms=4.0,
        write_p99_ms=10.0, written_ms=M0 + 60_050,
    )  # fmt: skip


def test_a_source_restarted_by_a_mode_switch_counts_from_zero() -> None:
    before = read_totals([status("ex1", 1000, 5, bad_json=9)], 1000)
    now = read_totals([status("ex1", 30, 0, bad_json=1)], 1030)  # a fresh FeedStatus

    row = build_row("n", "all", M0, now, before)

    assert (row.ticks_in, row.ticks_out, row.reconnects) == (30, 30, 0)
    assert row.rejects == {"bad_json": 1}
    assert (row.write_count, row.write_p50_ms, row.write_p99_ms) == (0, 0.0, 0.0)


def test_nothing_happened_gives_a_row_of_zeros() -> None:
    totals = read_totals([status("ex1", 10, 1, bad_json=1)], 10)

    row = build_row("n", "ingest", M0, totals, totals)

    assert (row.ticks_in, row.ticks_out, row.reconnects, row.rejects) == (0, 0, 0, {})
    assert row.role == "ingest"


class FakeStats:
    kind = "fake"

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], PipelineStatsRow] = {}
        self.down = False
        self.calls = 0

    async def write_stats(self, rows: Sequence[PipelineStatsRow]) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("fake: down")
        for r in rows:
            self.rows[(r.node_id, r.minute_ms)] = r

    async def read_stats(
        self, node: str | None, since_ms: int | None, limit: int
    ) -> list[PipelineStatsRow]:
        return sorted(self.rows.values(), key=lambda r: -r.minute_ms)[:limit]


class Pipeline:
    """Counters that a test moves, and a wall clock it sets."""

    def __init__(self) -> None:
        self.now = M0 + 10_000
        self.feed = status("ex1", 0)
        self.folded = 0
        self.writes: list[float] = []

    def totals(self) -> Totals:
        return read_totals([self.feed], self.folded)

    def take_writes(self) -> list[float]:
        taken, self.writes = self.writes, []
        return taken

    def writer(self, store: FakeStats, max_pending: int = 60) -> DiagnosticsWriter:
        return DiagnosticsWriter(store, "node-a", "all", self.totals, lambda: {"fanin": 3},
                                 self.take_writes, lambda: self.now,
                                 max_pending=max_pending)  # fmt: skip


async def test_one_row_per_minute_boundary_of_the_clock() -> None:
    p, store = Pipeline(), FakeStats()
    w = p.writer(store)
    w.begin()
    p.feed.ticks, p.folded, p.writes = 40, 40, [0.002]

    assert await w.write_due() == 0  # the minute has not ended
    p.now = M0 + 60_020
    assert await w.write_due() == 1
    p.feed.ticks, p.folded = 70, 65
    p.now = M0 + 90_000
    assert await w.write_due() == 0
    p.now = M0 + 120_001
    assert await w.write_due() == 1

    first, second = store.rows[("node-a", M0)], store.rows[("node-a", M0 + 60_000)]
    assert (first.ticks_in, first.ticks_out, first.write_count, first.write_p99_ms) == (
        40, 40, 1, 2.0)  # fmt: skip
    assert (second.ticks_in, second.ticks_out, second.write_count) == (30, 25, 0)
    assert first.queue_depths == {"fanin": 3}
    assert len(store.rows) == 2


async def test_kafka_lag_hook_goes_into_the_row() -> None:
    p, store = Pipeline(), FakeStats()
    w = p.writer(store)
    w.begin()
    w.lag_by_partition = lambda: {"marketflow.ticks:3": 12}
    p.now = M0 + 60_000

    await w.write_due()

    assert store.rows[("node-a", M0)].lag_by_partition == {"marketflow.ticks:3": 12}


async def test_rows_wait_while_the_store_is_down_then_are_written_bounded() -> None:
    p, store = Pipeline(), FakeStats()
    w = p.writer(store, max_pending=2)
    w.begin()
    store.down = True
    for i in range(1, 4):
        p.now = M0 + i * 60_000
        assert await w.write_due() == 0
    assert w.status()["rows_pending"] == 2
    assert w.rows_dropped == 1
    assert w.last_error

    store.down = False
    p.now = M0 + 4 * 60_000
    assert await w.write_due() == 2  # the newest two: the bound holds with the new row too

    assert sorted(m for _, m in store.rows) == [M0 + 120_000, M0 + 180_000]
    assert (w.status()["rows_pending"], w.rows_dropped, w.rows_written) == (0, 2, 2)


async def test_run_sleeps_to_each_minute_boundary_and_writes_its_row() -> None:
    p, store = Pipeline(), FakeStats()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 3:
            raise _Stop
        p.now += int(seconds * 1000)

    w = DiagnosticsWriter(store, "node-a", "all", p.totals, dict, p.take_writes,
                          lambda: p.now, sleep=sleep)  # fmt: skip
    with pytest.raises(_Stop):
        await w.run()

    assert slept[0] == pytest.approx(50.05)
    assert sorted(m for _, m in store.rows) == [M0, M0 + 60_000, M0 + 120_000]


class _Stop(Exception):
    pass


# -- GET /diagnostics ----------------------------------------------------------------------


async def _get(store: FakeStats | None, query: str) -> tuple[int, dict[str, Any]]:
    app = new_app()
    add_diagnostics_routes(app, store)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(f"/diagnostics{query}")
        return resp.status, await resp.json()


async def test_get_diagnostics_answers_the_rows_newest_first() -> None:
    store = FakeStats()
    p = Pipeline()
    await store.write_stats([
        build_row("node-a", "all", M0, p.totals(), Totals(), written_ms=M0 + 60_050),
        build_row("node-a", "all", M0 + 60_000, p.totals(), Totals(), written_ms=M0 + 120_050),
    ])  # fmt: skip

    status, body = await _get(store, "?node=node-a&since=2023-11-14T22:14:00Z&limit=1")

    assert status == 200
    assert body["stored"] is True
    (row,) = body["rows"]
    assert row["minute"] == "2023-11-14T22:15:00.000Z"
    assert row["node"] == "node-a"
    assert row["write_latency_ms"] == {"n": 0, "p50": 0.0, "p99": 0.0}


@pytest.mark.parametrize(
    "query",
    ["?limit=0", "?limit=1441", "?limit=abc", "?limit=" + "9" * 500, "?since=yesterday",
     "?since=2026-01-01T00:00:00", "?node=a%20b", "?node=" + "x" * 129, "?nodes=a",
     "?limit=1&limit=2"],
)  # fmt: skip
async def test_bad_parameters_answer_400_json(query: str) -> None:
    status, body = await _get(FakeStats(), query)

    assert status == 400
    assert body["error"]


async def test_embedded_storage_answers_no_rows_and_says_so() -> None:
    assert await _get(None, "?limit=5") == (200, {"rows": [], "stored": False})
    assert (await _get(None, "?limit=0"))[0] == 400
