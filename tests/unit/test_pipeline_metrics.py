"""The latency histograms and counters of issue 13: recorded per flush, per write batch and per
batch (never per tick), exported on /metrics with bounded labels, percentiles on /health."""

from __future__ import annotations

import asyncio
import random
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from marketflow.app.aggregator import Aggregator
from marketflow.app.minute_writer import MinuteWriter
from marketflow.app.pipeline_metrics import PipelineMetrics
from marketflow.backoff import Backoff
from marketflow.domain.errors import StoreUnavailable
from marketflow.domain.ticks import BookUpdate, TickBatch
from marketflow.entrypoints.http_api import HEALTH
from marketflow.entrypoints.http_common import ControlGuard, json_response, new_app
from marketflow.entrypoints.http_metrics import UNMATCHED, HttpMetrics
from marketflow.entrypoints.metrics import metrics_renderer
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeSpill, FakeStore, ManualClock, RecordingSink
from tests.unit.test_http_api import build_test_app
from tests.unit.writer_kit import row

T0 = 1_795_482_600_000


def received_at(exchange: str, received_ms: int, *ticks: tuple[str, float, int]) -> TickBatch:
    by: dict[str, list[tuple[float, int]]] = {}
    for sym, p, ts in ticks:
        by.setdefault(sym, []).append((p, ts))
    return TickBatch(exchange, by, received_ms, len(ticks))


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    assert m is not None, f"{name}{{{want}}} not in:\n{text}"
    return float(m.group(1))


async def test_each_cache_write_observes_the_oldest_receipt_per_source_once() -> None:
    clock = ManualClock(T0 + 1_000)
    cache = FakeCache()
    agg = Aggregator(asyncio.Queue(), cache, RecordingSink(FakeStore()), PipelineSettings(), clock)
    agg.fold(received_at("ex1", T0 + 900, ("BTCUSDT", 1.0, T0), ("ETHUSDT", 2.0, T0 + 10)))
    agg.fold(received_at("ex2", T0 + 950, ("BTCUSDT", 3.5, T0 + 30)))
    agg.fold(received_at("ex2", T0 + 700, ("ETHUSDT", 3.0, T0 + 20)))  # folded later, older
    agg.fold(TickBatch("ex3", {}, T0, 0, books=[BookUpdate("ex3", "X", 1.0, 2.0, T0)]))

    await agg.flush()

    hist = agg.metrics.tick_to_cache
    # One observation per source per write (not per tick, pair or batch): the oldest receipt.
    assert hist["ex1"].count == 1
    assert hist["ex1"].total == pytest.approx(0.1)
    assert hist["ex2"].count == 1
    assert hist["ex2"].total == pytest.approx(0.3)
    assert "ex3" not in hist  # books alone are not ticks
    clock.now_ms += 500
    await agg.flush()
    assert hist["ex1"].count == 1  # nothing written, nothing observed
    agg.fold(received_at("ex1", T0 + 1_400, ("BTCUSDT", 1.5, T0 + 1_000)))
    await agg.flush()
    assert hist["ex1"].count == 2
    assert hist["ex1"].total == pytest.approx(0.2)  # from its own receipt, not the first one


async def test_ticks_held_by_a_cache_outage_are_observed_from_their_receipt_when_written() -> None:
    clock = ManualClock(T0 + 1_000)
    cache = FakeCache()
    cache.down = True
    agg = Aggregator(asyncio.Queue(), cache, RecordingSink(FakeStore()), PipelineSettings(), clock)
    agg.fold(received_at("ex1", T0 + 900, ("BTCUSDT", 1.0, T0)))

    await agg.flush()

    assert agg.metrics.tick_to_cache == {}
    assert agg.metrics.snapshot()["tick_to_cache_ms"]["n"] == 0
    agg.fold(received_at("ex1", T0 + 2_000, ("BTCUSDT", 1.1, T0 + 1_500)))
    cache.down = False
    clock.now_ms = T0 + 10_000  # past the retry backoff
    await agg.flush()
    assert agg.metrics.tick_to_cache["ex1"].count == 1
    assert agg.metrics.tick_to_cache["ex1"].total == pytest.approx(9.1)  # the outage included


def test_recent_percentiles_of_tick_to_cache() -> None:
    pm = PipelineMetrics()
    pm.recent_tick_to_cache.values.extend([i / 1000 for i in range(1, 101)])  # 1..100 ms

    got = pm.snapshot()["tick_to_cache_ms"]

    assert got == {"n": 100, "p50_ms": 51.0, "p99_ms": 100.0, "max_ms": 100.0}


def test_book_updates_are_counted_per_venue_per_batch() -> None:
    agg = Aggregator(
        asyncio.Queue(), FakeCache(), RecordingSink(FakeStore()), PipelineSettings(),
        ManualClock(T0),
    )  # fmt: skip
    books = [BookUpdate("fix1", s, 1.0, 2.0, T0) for s in ("BTCUSDT", "ETHUSDT", "BTCUSDT")]
    agg.fold(TickBatch("fix1", {}, T0, 0, books=books))
    agg.fold(TickBatch("fix1", {}, T0, 0, books=books[:1]))
    agg.fold(TickBatch("json1", {}, T0, 0))

    assert agg.metrics.book_updates == {"fix1": 4}


class SteppingTimer:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def test_minute_writer_observes_each_successful_write_batch_only() -> None:
    store = FakeStore()
    w = MinuteWriter(
        store, FakeSpill(), 1000, ManualClock(T0),
        retry=Backoff(0.01, 0.05, random.Random(1)), timer=SteppingTimer(0.004),
    )  # fmt: skip
    await w.start()
    try:
        w.submit([row(0), row(1)])
        await w.flush()
        assert w.metrics.minute_write.count == 1
        assert w.metrics.minute_write.total == pytest.approx(0.004)
        store.down = True
        w.submit([row(2)])
        with pytest.raises(StoreUnavailable):
            await w.flush()
        assert w.metrics.minute_write.count == 1
    finally:
        store.down = False
        await w.aclose()
    assert w.metrics.minute_write.count == 2  # the last attempt at close wrote row 2


async def _ok(request: web.Request) -> web.Response:
    return json_response({"ok": request.match_info.get("symbol", "")})


async def test_http_duration_is_labelled_by_route_pattern_never_by_raw_path() -> None:
    http = HttpMetrics()
    app = new_app()
    app.router.add_get("/prices/latest/{symbol}", _ok)
    app.router.add_get("/health", _ok)
    http.install(app)
    async with TestClient(TestServer(app)) as client:
        for path in ("/prices/latest/BTCUSDT", "/prices/latest/ETHUSDT", "/health", "/x/1", "/y"):
            await client.get(path)
        await client.post("/health")  # 405: no route answers it either

    assert {r: h.count for r, h in http.by_route.items()} == {
        "/prices/latest/{symbol}": 2,
        "/health": 1,
        UNMATCHED: 3,
    }


async def test_metrics_page_has_the_new_families_with_bounded_labels() -> None:
    parts = build_test_app(ControlGuard())
    report = parts.app[HEALTH]
    http = HttpMetrics()
    http.observe("/health", 0.002)
    agg = parts.agg
    agg.fold(received_at("exchange1", T0 + 29_900, ("BTCUSDT", 101.5, T0 + 29_000)))
    agg.fold(received_at("exchange1", T0 + 29_900, ("NOTCONFIGURED", 5.0, T0 + 29_000)))
    agg.fold(TickBatch("fixvenue", {}, T0, 0, books=[BookUpdate("fixvenue", "X", 1, 2, T0)]))
    await agg.flush()

    text = metrics_renderer(report, ("BTCUSDT", "ETHUSDT"), http)().decode()

    assert sample(text, "marketflow_latest_price", pair="BTCUSDT", source="exchange1") == 101.5
    assert "NOTCONFIGURED" not in text  # only configured pairs get a price series
    assert sample(text, "marketflow_tick_to_cache_seconds_count", source="exchange1") == 1
    assert sample(text, "marketflow_tick_to_cache_seconds_sum", source="exchange1") == 0.1
    assert sample(text, "marketflow_book_updates_total", source="fixvenue") == 1
    assert sample(text, "marketflow_http_request_duration_seconds_count", route="/health") == 1
    assert sample(text, "marketflow_minute_write_duration_seconds_count") == 0
    assert sample(text, "marketflow_flushes_total") == 1
    for name in ("storage_embedded", "cache_embedded"):
        assert sample(text, f"marketflow_{name}") == 0
    assert re.search(r"^marketflow_\w+\{[^}]*symbol=", text, re.MULTILINE) is None
    health = report.build()
    assert health["pipeline"]["tick_to_cache_ms"]["n"] == 1
    assert health["pipeline"]["tick_to_cache_ms"]["max_ms"] == 100.0
