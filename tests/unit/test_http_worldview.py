"""GET /bbo, /bbo/{symbol} and /book/{symbol}: answers, depth validation, 404s, dropped venues."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from marketflow.app.world_view import WorldView
from marketflow.domain.ticks import BookUpdate, TickBatch
from marketflow.entrypoints.http_common import ControlGuard
from tests.unit.test_http_api import T0, Parts, build_test_app

NOW = T0 + 30_000  # build_test_app's clock


class Client:
    def __init__(self, client: TestClient[Any, Any], parts: Parts) -> None:
        self.client, self.parts = client, parts
        assert parts.view is not None
        self.view: WorldView = parts.view

    async def get(self, path: str) -> tuple[int, Any]:
        resp = await self.client.get(path)
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()

    def books(self, *updates: BookUpdate) -> None:
        self.parts.agg.fold(TickBatch(updates[0].exchange, {}, NOW, 0, books=list(updates)))


@pytest.fixture
async def api() -> AsyncIterator[Client]:
    parts = build_test_app(ControlGuard(None))
    async with TestClient(TestServer(parts.app)) as client:
        yield Client(client, parts)


def two_venues(api: Client) -> None:
    api.books(
        BookUpdate("exchange1", "BTCUSDT", 100.0, 101.0, NOW - 250, 1.5, 2.0,
                   ((100.0, 1.5), (99.5, 4.0), (99.0, 1.0)), ((101.0, 2.0), (101.5, 3.0))),
    )  # fmt: skip
    api.books(BookUpdate("exchange2", "BTCUSDT", 100.2, 101.4, NOW - 1000, 0.3, None))


async def test_bbo_names_each_side_s_venue_price_size_and_age(api: Client) -> None:
    two_venues(api)

    status, body = await api.get("/bbo/btcusdt")  # any case, as the price routes

    assert status == 200
    assert body == {
        "symbol": "BTCUSDT",
        "seq": 2,
        "bid": {"exchange": "exchange2", "price": 100.2, "size": 0.3,
                "timestamp": "2026-11-24T01:10:29.000Z", "age_ms": 1000},
        "ask": {"exchange": "exchange1", "price": 101.0, "size": 2.0,
                "timestamp": "2026-11-24T01:10:29.750Z", "age_ms": 250},
        "spread": pytest.approx(0.8),
        "mid": pytest.approx(100.6),
        "crossed": False,
        "locked": False,
        "venues": ["exchange1", "exchange2"],
        "dropped": [],
    }  # fmt: skip


async def test_crossed_and_a_dropped_venue_are_shown(api: Client) -> None:
    two_venues(api)
    api.books(BookUpdate("exchange2", "BTCUSDT", 101.2, 102.0, NOW - 10))

    body = (await api.get("/bbo/BTCUSDT"))[1]
    assert (body["crossed"], body["locked"], body["spread"]) == (True, False, pytest.approx(-0.2))
    seq = body["seq"]

    api.view.set_state("exchange2", "down")
    body = (await api.get("/bbo/BTCUSDT"))[1]
    assert (body["bid"]["exchange"], body["bid"]["price"], body["crossed"]) == (
        "exchange1", 100.0, False,
    )  # fmt: skip
    assert body["dropped"] == [
        {"exchange": "exchange2", "reason": "down", "last_update": "2026-11-24T01:10:29.990Z"}
    ]
    assert body["venues"] == ["exchange1"]
    assert body["seq"] == seq + 1


async def test_bbo_of_every_pair(api: Client) -> None:
    two_venues(api)
    api.books(BookUpdate("exchange1", "ETHUSDT", 3000.0, 3001.0, NOW))

    status, body = await api.get("/bbo")

    assert status == 200
    assert [b["symbol"] for b in body["bbo"]] == ["BTCUSDT", "ETHUSDT"]
    assert body["bbo"][1]["bid"]["price"] == 3000.0


async def test_unknown_or_unquoted_symbol_is_404_json(api: Client) -> None:
    two_venues(api)
    for path in ("/bbo/NOPEUSDT", "/bbo/ETHUSDT", "/book/NOPEUSDT", "/book/ETHUSDT?depth=2"):
        status, body = await api.get(path)
        assert status == 404, path
        assert "no quotes" in body["error"]


async def test_book_merges_levels_best_first_to_the_depth_asked(api: Client) -> None:
    two_venues(api)

    status, body = await api.get("/book/BTCUSDT?depth=3")

    assert status == 200
    assert body["symbol"] == "BTCUSDT"
    assert body["seq"] == 2
    assert body["spread"] == pytest.approx(0.8)
    assert body["bids"] == [
        {"exchange": "exchange2", "price": 100.2, "amount": 0.3},
        {"exchange": "exchange1", "price": 100.0, "amount": 1.5},
        {"exchange": "exchange1", "price": 99.5, "amount": 4.0},
    ]
    assert body["asks"] == [
        {"exchange": "exchange1", "price": 101.0, "amount": 2.0},
        {"exchange": "exchange2", "price": 101.4, "amount": None},
        {"exchange": "exchange1", "price": 101.5, "amount": 3.0},
    ]
    default = (await api.get("/book/BTCUSDT"))[1]  # no depth: the configured max (5)
    assert (len(default["bids"]), len(default["asks"])) == (4, 3)


@pytest.mark.parametrize(
    "query",
    ["depth=0", "depth=6", "depth=-1", "depth=abc", "depth=1.5", "depth=", "depth=1&depth=2",
     "depth=99999999999999999999", "deep=2", "depth=%C2%B2"],
)  # fmt: skip
async def test_bad_depth_or_unknown_parameter_is_400_json(api: Client, query: str) -> None:
    two_venues(api)

    status, body = await api.get(f"/book/BTCUSDT?{query}")

    assert status == 400, query
    assert body["error"]


async def test_unknown_parameter_on_bbo_is_400(api: Client) -> None:
    two_venues(api)
    assert (await api.get("/bbo/BTCUSDT?depth=1"))[0] == 400
    assert (await api.get("/bbo?x=1"))[0] == 400
