"""The world view across two FIX venue simulator processes feeding one daemon (issue 13).

With ``--rate 0`` a venue sends its snapshot and nothing else: its book is a known function of
its options (start price, ``--offset``, ``--spread``), so the test knows which venue has the
best bid and which the best offer, to the cent. Then one venue stops: it leaves the view at
once, listed as dropped, and the other one's quote is the whole view.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import daemon_config
from tests.e2e.procs import Daemon, Simulator
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

# BTCUSDT starts at 100000 on both venues. venue_a: half-spread 1e-4, 3 levels with sizes
# -> bid 99990.00, ask 100010.00, levels 10 apart. venue_b: 0.5 bp higher, top of book only
# (264=1) -> bid 99995.00, ask 100015.00. Best bid: venue_b; best offer: venue_a.
A_BID, A_ASK, B_BID, B_ASK = 99990.0, 100010.0, 99995.0, 100015.0


@dataclass
class Venues:
    a: Simulator
    b: Simulator
    daemon: Daemon


@pytest.fixture
def venues(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[Venues]:
    book = ("--rate", "0", "--spread", "1e-4")
    a = Simulator(tmp_path, "venue_a", "fix", *book, "--depth", "3", "--comp-id", "VA")
    b = Simulator(tmp_path, "venue_b", "fix", *book, "--offset", "5e-5", "--comp-id", "VB")
    a.start()
    b.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    fix = {"host": "127.0.0.1", "protocol": "fix", "heartbeat_s": 1}
    config["exchanges"] = [
        {"name": "venue_a", "port": a.port, "target_comp_id": "VA", "market_depth": 3, **fix},
        {"name": "venue_b", "port": b.port, "target_comp_id": "VB", **fix},
    ]
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        yield Venues(a, b, daemon)
    finally:
        daemon.stop()
        a.stop()
        b.stop()


def both_quoted(status: int, body: Any) -> bool:
    return status == 200 and body["venues"] == ["venue_a", "venue_b"]


@pytest.mark.timeout(120)
def test_bbo_names_the_venue_of_each_side_and_drops_a_venue_that_goes_away(
    venues: Venues,
) -> None:
    d = venues.daemon
    bbo = d.wait_for("/bbo/BTCUSDT", both_quoted)

    assert (bbo["bid"]["exchange"], bbo["bid"]["price"]) == ("venue_b", B_BID)
    assert (bbo["ask"]["exchange"], bbo["ask"]["price"]) == ("venue_a", A_ASK)
    assert bbo["bid"]["size"] is None  # 264=1: top of book, no sizes
    assert bbo["ask"]["size"] > 0  # 264=3: sizes
    assert bbo["spread"] == pytest.approx(A_ASK - B_BID)
    assert (bbo["crossed"], bbo["locked"], bbo["dropped"]) == (False, False, [])
    assert bbo["bid"]["timestamp"].endswith("Z")
    status, every = d.get("/bbo")
    assert status == 200
    assert {b["symbol"] for b in every["bbo"]} == {"BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT",
                                                   "ETHUSDT"}  # fmt: skip

    status, book = d.get("/book/BTCUSDT?depth=4")
    assert status == 200
    assert [(lv["exchange"], lv["price"]) for lv in book["bids"]] == [
        ("venue_b", B_BID), ("venue_a", A_BID), ("venue_a", A_BID - 10), ("venue_a", A_BID - 20),
    ]  # fmt: skip
    assert [(lv["exchange"], lv["price"]) for lv in book["asks"]] == [
        ("venue_a", A_ASK), ("venue_b", B_ASK), ("venue_a", A_ASK + 10), ("venue_a", A_ASK + 20),
    ]  # fmt: skip
    assert book["seq"] >= bbo["seq"]
    assert d.get("/book/BTCUSDT?depth=0")[0] == 400
    assert d.get("/bbo/NOPEUSDT")[0] == 404

    venues.b.stop()  # the link drops: venue_b leaves the view at once, listed as dropped
    bbo = d.wait_for("/bbo/BTCUSDT", lambda s, b: s == 200 and b["venues"] == ["venue_a"])
    assert (bbo["bid"]["exchange"], bbo["bid"]["price"]) == ("venue_a", A_BID)
    assert [(x["exchange"], x["reason"]) for x in bbo["dropped"]] == [("venue_b", "down")]
