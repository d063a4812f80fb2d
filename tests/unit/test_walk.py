"""The simulator's price walks: starting prices, step bounds, determinism, line format."""

from __future__ import annotations

import orjson
import pytest

from marketflow.domain.walk import PAIRS, UNKNOWN_PAIR_START, PriceWalk, render_rounds
from marketflow.simulator.json_exchange import START_PRICES, start_prices, walk_for_port


@pytest.mark.parametrize(
    ("port", "btc", "eth"), [(40101, 100000.0, 3050.0), (40102, 100029.0, 3034.0),
                             (40103, 100049.0, 3022.0)]
)  # fmt: skip
def test_each_reference_port_starts_at_its_prices(port: int, btc: float, eth: float) -> None:
    walk = walk_for_port(port, seed=1)

    prices = dict(zip(walk.pairs, walk.prices(), strict=True))

    assert prices["BTCUSDT"] == btc
    assert prices["ETHUSDT"] == eth


def test_unknown_port_uses_40101_prices() -> None:
    assert start_prices(45555) == START_PRICES[40101]


def test_same_seed_gives_same_walk_and_other_seed_differs() -> None:
    a, b, c = (walk_for_port(40101, seed=s) for s in (7, 7, 8))

    steps_a = [a.step() for _ in range(100)]

    assert steps_a == [b.step() for _ in range(100)]
    assert steps_a != [c.step() for _ in range(100)]


def test_btc_moves_at_most_250_and_never_below_99_percent() -> None:
    walk = walk_for_port(40101, seed=3)
    prev = walk.prices()[0]
    for _ in range(10_000):
        p = walk.step()[0]
        assert p >= 0.99 * prev - 1e-9
        assert abs(p - prev) <= 250.0 + 1e-9
        prev = p


def test_btc_floor_applies_when_price_is_small() -> None:
    # At 1000, U(-250, 250) could drop 25 %: the 0.99 p floor must hold it.
    walk = PriceWalk({"BTCUSDT": 1000.0}, ("BTCUSDT",), seed=5)
    prev = 1000.0
    for _ in range(1000):
        p = walk.step()[0]
        assert p >= 0.99 * prev - 1e-12
        prev = p


def test_other_pairs_move_at_most_one_percent_per_tick() -> None:
    walk = walk_for_port(40102, seed=4)
    prev = walk.prices()
    for _ in range(10_000):
        now = walk.step()
        for before, after in zip(prev[1:], now[1:], strict=True):
            assert abs(after / before - 1.0) <= 0.01 + 1e-12
        prev = tuple(now)


def test_unknown_pair_gets_a_default_start() -> None:
    walk = walk_for_port(40101, ("BTCUSDT", "XRPUSDT"))

    assert walk.prices() == (100000.0, UNKNOWN_PAIR_START)


def test_render_rounds_is_the_feed_format_one_line_per_pair_in_order() -> None:
    walk = walk_for_port(40101, seed=2)
    expected = [walk.step() for _ in range(3)]
    replay = walk_for_port(40101, seed=2)

    data = render_rounds(replay, 3, 1795482633071)

    assert data.endswith(b"\n")
    rows = [orjson.loads(line) for line in data.splitlines()]
    assert [r["symbol"] for r in rows] == list(PAIRS) * 3
    assert {r["timestamp"] for r in rows} == {1795482633071}
    assert [r["price"] for r in rows] == [p for step in expected for p in step]
    assert all(set(r) == {"symbol", "price", "timestamp"} for r in rows)
