import asyncio
import gc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from marketflow.app.aggregator import Aggregator
from marketflow.app.health import HealthReport
from marketflow.app.ingest import RunningSource
from marketflow.app.loop_health import LoopHealth
from marketflow.app.modes import ModeController
from marketflow.app.queries import PriceQueries
from marketflow.app.world_view import WorldView
from marketflow.domain.aggregates import MinuteRow
from marketflow.domain.feeds import FeedStatus, Source
from marketflow.domain.ticks import TickBatch
from marketflow.entrypoints.http_api import build_app
from marketflow.entrypoints.http_common import ControlGuard, rfc3339
from marketflow.entrypoints.metrics import metrics_renderer
from marketflow.settings import DEFAULT_PAIRS, PipelineSettings, WorldViewSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock, RecordingSink

T0 = 1_795_482_600_000


class IdleProducer:
    async def run(self, out: asyncio.Queue[tuple[bytes, int]], status: FeedStatus) -> None:
        status.connected = True
        await asyncio.Event().wait()


class NullParser:
    def parse(self, item: bytes, received_ms: int) -> TickBatch:
        return TickBatch("x", {}, received_ms, 0)


def sources(*names: str) -> list[Source[Any]]:
    return [Source(FeedStatus(n, "json"), IdleProducer(), NullParser()) for n in names]


class Api:
    def __init__(
        self, client: TestClient[Any, Any], agg: Aggregator, store: FakeStore, clock: ManualClock
    ) -> None:
        self.client, self.agg, self.store, self.clock = client, agg, store, clock

    async def get(self, path: str) -> tuple[int, Any]:
        resp = await self.client.get(path)
        return resp.status, await resp.json()


TOKEN = "s3cret-control-token"  # noqa: S105 - a test value, no secret


@pytest.fixture
def control(request: pytest.FixtureRequest) -> ControlGuard:
    """No token (loopback clients only), as the e2e daemon runs; a test may parametrize a
    token (indirect). A fresh guard per test: no count carries over."""
    token = getattr(request, "param", None)
    return ControlGuard(SecretStr(token) if token else None)


@dataclass
class Parts:
    """The API on fakes; ``modes`` starts in no mode: switch it (and stop it) yourself."""

    app: web.Application
    agg: Aggregator
    modes: ModeController
    store: FakeStore
    clock: ManualClock
    loop: LoopHealth
    view: WorldView | None = None  # the world view (GET /bbo, /book), fed by agg.fold


def build_test_app(control: ControlGuard) -> Parts:
    clock = ManualClock(T0 + 30_000)
    store = FakeStore()
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    agg = Aggregator(fanin, FakeCache(), RecordingSink(store), PipelineSettings(), clock)
    live, test = ["exchange1", "exchange2"], ["test-exchange1"]
    modes = ModeController(
        {"live": lambda: sources(*live), "test": lambda: sources(*test)},
        {"live": live, "test": test},
        lambda src: RunningSource(src, fanin, 5, 8),
    )
    writer = type("W", (), {"status": lambda self: {"state": "up", "kind": "fake"}})()
    report = HealthReport(
        agg,
        modes,
        writer,
        False,
        False,
        fanin.qsize,
        clock,
        lambda: {"http": control.stats()},
        loop=LoopHealth(),
    )
    queries = PriceQueries(
        agg, lambda: store, modes.exchanges, modes.known_exchanges, DEFAULT_PAIRS, clock
    )
    view = WorldView(
        WorldViewSettings(max_depth=5),
        clock,
        lambda: [r.source.status for r in modes.running()],
        stamp=rfc3339,
    )
    agg.on_books = view.on_books
    agg.on_flush = view.poll
    app = build_app(queries, modes, report, metrics_renderer(report), control, view)
    assert report.loop is not None
    return Parts(app, agg, modes, store, clock, report.loop, view)


@pytest.fixture
async def api(control: ControlGuard) -> AsyncIterator[Api]:
    # Everything is built per test, so a test that switches the mode leaks it into no other.
    parts = build_test_app(control)
    await parts.modes.switch("live")
    parts.loop.start()
    async with TestClient(TestServer(parts.app)) as client:
        yield Api(client, parts.agg, parts.store, parts.clock)
    await parts.loop.aclose()
    await parts.modes.stop()


def fold(agg: Aggregator, exchange: str, *ticks: tuple[str, float, int]) -> None:
    by: dict[str, list[tuple[float, int]]] = {}
    for sym, p, ts in ticks:
        by.setdefault(sym, []).append((p, ts))
    agg.fold(TickBatch(exchange, by, T0, len(ticks)))


async def test_latest_is_404_json_before_any_tick(api: Api) -> None:
    status, body = await api.get("/prices/latest/BTCUSDT")
    assert status == 404
    assert "error" in body


async def test_latest_across_exchanges_is_the_newest_tick(api: Api) -> None:
    fold(api.agg, "exchange1", ("BTCUSDT", 100.0, T0 + 1000))
    fold(api.agg, "exchange2", ("BTCUSDT", 101.5, T0 + 2000))
    status, body = await api.get("/prices/latest/BTCUSDT")
    assert status == 200
    assert body == {
        "symbol": "BTCUSDT",
        "exchange": "all",
        "price": 101.5,
        "timestamp": "2026-11-24T01:10:02.000Z",
        "source": "exchange2",
    }
    status, body = await api.get("/prices/latest/exchange1/BTCUSDT")
    assert (status, body["price"], body["exchange"]) == (200, 100.0, "exchange1")


async def test_latest_answer_is_reused_only_while_its_tick_is_the_newest(api: Api) -> None:
    fold(api.agg, "exchange1", ("BTCUSDT", 100.0, T0 + 1000))
    first = await api.get("/prices/latest/BTCUSDT")
    again = await api.get("/prices/latest/BTCUSDT")
    fold(api.agg, "exchange1", ("BTCUSDT", 100.5, T0 + 1000))  # same ms, a later tick
    same_ms = await api.get("/prices/latest/BTCUSDT")
    fold(api.agg, "exchange2", ("BTCUSDT", 100.5, T0 + 1000))  # same price and ms, elsewhere
    tie = await api.get("/prices/latest/BTCUSDT")
    one = await api.get("/prices/latest/exchange1/BTCUSDT")
    fold(api.agg, "exchange2", ("BTCUSDT", 99.0, T0 + 1001))
    newer = await api.get("/prices/latest/BTCUSDT")

    assert first == again
    assert (first[1]["price"], same_ms[1]["price"]) == (100.0, 100.5)
    assert tie[1]["source"] in ("exchange1", "exchange2")
    assert (one[1]["exchange"], "source" in one[1]) == ("exchange1", False)
    assert (newer[1]["price"], newer[1]["source"]) == (99.0, "exchange2")
    assert newer[1]["timestamp"] == "2026-11-24T01:10:01.001Z"


async def test_symbol_is_case_insensitive(api: Api) -> None:
    fold(api.agg, "exchange1", ("BTCUSDT", 100.0, T0 + 1000))
    status, body = await api.get("/prices/latest/exchange1/btcusdt")
    assert (status, body["symbol"]) == (200, "BTCUSDT")


async def test_unknown_symbol_and_exchange_are_404(api: Api) -> None:
    assert (await api.get("/prices/latest/NOPE"))[0] == 404
    assert (await api.get("/prices/latest/nowhere/BTCUSDT"))[0] == 404
    assert (await api.get("/prices/highest/nowhere/BTCUSDT?period=1m"))[0] == 404


@pytest.mark.parametrize(
    "period", ["0s", "abc", "5x", "-1m", "1.5s", "", "99999999h", "9" * 5000 + "s", "\u0661s"]
)
async def test_bad_period_is_400_with_json_error(api: Api, period: str) -> None:
    fold(api.agg, "exchange1", ("BTCUSDT", 100.0, T0 + 29_000))
    status, body = await api.get(f"/prices/highest/BTCUSDT?period={period}")
    assert status == 400
    assert "period" in body["error"]


async def test_period_stats_are_exact_over_the_window(api: Api) -> None:
    fold(api.agg, "exchange1", ("BTCUSDT", 10.0, T0 + 1_000), ("BTCUSDT", 30.0, T0 + 28_000))
    fold(api.agg, "exchange2", ("BTCUSDT", 20.0, T0 + 29_500))
    s, hi = await api.get("/prices/highest/BTCUSDT?period=5s")
    s2, lo = await api.get("/prices/lowest/BTCUSDT?period=5s")
    s3, avg = await api.get("/prices/average/BTCUSDT?period=1m")
    assert (s, hi["price"], hi["period"], hi["exchange"]) == (200, 30.0, "5s", "all")
    assert hi["timestamp"] == "2026-11-24T01:10:28.000Z"
    assert (s2, lo["price"]) == (200, 20.0)
    assert (s3, avg["price"], avg["count"]) == (200, 20.0, 3)
    s4, one = await api.get("/prices/average/exchange1/BTCUSDT?period=3s")
    assert (s4, one["price"], one["count"]) == (200, 30.0, 1)


async def test_no_period_merges_stored_minutes_with_the_window(api: Api) -> None:
    api.store.rows[("exchange1", "BTCUSDT", T0 - 120_000)] = MinuteRow(
        "exchange1", "BTCUSDT", T0 - 120_000, 2.0, 1.0, 3.0, 10
    )
    fold(api.agg, "exchange1", ("BTCUSDT", 5.0, T0 + 1_000))
    status, body = await api.get("/prices/average/BTCUSDT")
    assert (status, body["count"], body["period"]) == (200, 11, "all")
    assert body["price"] == pytest.approx(25.0 / 11)
    _, lo = await api.get("/prices/lowest/BTCUSDT")
    assert lo["price"] == 1.0


async def test_mode_switch_answers_mode_in_force_and_scopes_all(api: Api) -> None:
    fold(api.agg, "exchange1", ("BTCUSDT", 100.0, T0 + 1000))
    resp = await api.client.post("/mode/test")
    assert (resp.status, await resp.json()) == (200, {"mode": "test"})
    assert (await api.get("/prices/latest/BTCUSDT"))[0] == 404  # no test data yet
    fold(api.agg, "test-exchange1", ("BTCUSDT", 7.0, T0 + 1000))
    assert (await api.get("/prices/latest/BTCUSDT"))[1]["price"] == 7.0
    resp = await api.client.post("/mode/bogus")
    assert resp.status == 404
    assert "error" in await resp.json()
    resp = await api.client.post("/mode/live")
    assert (await resp.json()) == {"mode": "live"}


async def test_health_reports_mode_exchanges_and_status(api: Api) -> None:
    await asyncio.sleep(0)  # let the idle producers mark themselves connected
    status, body = await api.get("/health")
    assert status == 200
    assert body["mode"] == "live"
    assert set(body["exchanges"]) == {"exchange1", "exchange2"}
    assert body["status"] == "ok"
    assert body["postgres"]["state"] == "up"
    assert set(body["queues"]) == {"fanin", "exchange1", "exchange2"}


async def test_metrics_exports_prometheus_text(api: Api) -> None:
    resp = await api.client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200
    assert 'marketflow_queue_depth{queue="fanin"} 0.0' in text


async def test_health_and_metrics_report_loop_lag_and_gc_pauses(api: Api) -> None:
    await asyncio.sleep(0.02)  # a few beats of the lag monitor
    gc.collect(0)
    _, body = await api.get("/health")
    text = await (await api.client.get("/metrics")).text()

    assert body["loop_lag"]["beats"] >= 1
    assert body["loop_lag"]["max_ms"] >= 0.0
    assert body["loop_lag"]["window_s"] == 1.0
    assert body["gc"]["collections"][0] >= 1
    assert body["gc"]["threshold"] == list(gc.get_threshold())
    assert set(body["gc"]["recent"]) >= {"n", "p50_ms", "p99_ms", "max_ms", "cpu_max_ms"}
    assert 'marketflow_loop_lag_seconds_bucket{le="+Inf"}' in text
    assert "marketflow_loop_lag_max_seconds" in text
    assert 'marketflow_gc_collections_total{generation="0"}' in text
    assert 'marketflow_gc_pause_seconds_bucket{le="0.0001"}' in text


async def test_unknown_route_is_json_404(api: Api) -> None:
    status, body = await api.get("/nope")
    assert status == 404
    assert "error" in body


@pytest.mark.parametrize("control", [TOKEN], ids=["token"], indirect=True)
async def test_with_a_token_mode_switch_is_401_without_it_and_200_with_it(api: Api) -> None:
    missing = await api.client.post("/mode/test")
    wrong = await api.client.post("/mode/test", headers={"Authorization": "Bearer nope"})
    assert (missing.status, wrong.status) == (401, 401)
    assert "error" in await missing.json()
    assert (await api.get("/mode"))[1] == {"mode": "live"}  # nothing switched

    ok = await api.client.post("/mode/test", headers={"Authorization": f"Bearer {TOKEN}"})

    assert (ok.status, await ok.json()) == (200, {"mode": "test"})
    assert (await api.get("/health"))[1]["http"] == {"control_unauthorized": 2}
    metrics = await (await api.client.get("/metrics")).text()
    assert "marketflow_http_unauthorized_total 2.0" in metrics


async def test_mode_of_an_earlier_test_does_not_leak(api: Api) -> None:
    # Runs after the token test above, which leaves its app in test mode.
    assert (await api.get("/mode"))[1] == {"mode": "live"}
