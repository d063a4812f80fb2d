"""Ingest nodes on a real Kafka broker (issue 14): the feeds group gives each feed to exactly
one node, a SIGKILLed node's feeds move to the survivor, and a FIX venue's ticks in the topic
are exactly the venue's trade log across the move (no doubled MsgSeqNum, no gap)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.e2e.kafka_ingest_kit import (
    IngestProc,
    kafka_config,
    new_tag,
    node_config,
    owner_runs,
    read_topic,
    tick_counter,
)
from tests.e2e.procs import Simulator, poll
from tests.harness.services import KafkaServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

FIX = "fixvenue"


def trade_log(path: Path) -> Counter[tuple[str, float, int]]:
    out: Counter[tuple[str, float, int]] = Counter()
    for line in path.read_bytes().splitlines():
        d = orjson.loads(line)
        out[(d["symbol"], float(d["price"]), int(d["timestamp"]))] += 1
    return out


def fix_exchange(venue: Simulator) -> dict[str, Any]:
    return {
        "name": FIX, "host": "127.0.0.1", "port": venue.port, "protocol": "fix",
        "sender_comp_id": "MARKETFLOW", "target_comp_id": "VENUE", "heartbeat_s": 2,
    }  # fmt: skip


def json_exchange(sim: Simulator) -> dict[str, Any]:
    return {"name": sim.name, "host": "127.0.0.1", "port": sim.port, "protocol": "json"}


@pytest.fixture
def venues(tmp_path: Path) -> Iterator[tuple[Simulator, Path, list[Simulator]]]:
    log = tmp_path / "trades.jsonl"
    fix = Simulator(tmp_path, FIX, "fix", "--trade-log", str(log), "--rate", "100", "--seed", "3")
    sims = [Simulator(tmp_path, f"json{i}") for i in (1, 2)]
    for s in (fix, *sims):
        s.start()
    try:
        yield fix, log, sims
    finally:
        for s in (fix, *sims):
            s.stop()


def test_two_nodes_split_the_feeds_and_a_killed_nodes_feeds_move_without_loss_or_doubles(
    tmp_path: Path, kafka_server: KafkaServer, venues: tuple[Simulator, Path, list[Simulator]]
) -> None:
    fix, log, sims = venues
    kafka = kafka_config(kafka_server.bootstrap, new_tag())
    exchanges = [fix_exchange(fix), *(json_exchange(s) for s in sims)]
    names = {e["name"] for e in exchanges}
    nodes = [
        IngestProc(tmp_path, n, node_config(tmp_path, n, kafka, exchanges)) for n in ("na", "nb")
    ]
    for n in nodes:
        n.start()
    try:
        # Each feed read by exactly one node, and every feed read: /health of both.
        def owners() -> dict[str, list[str]]:
            return {n.name: n.owned() for n in nodes}

        split = poll(
            owners,
            lambda o: all(o.values()) and sorted(o["na"] + o["nb"]) == sorted(names),
            30,
            "both nodes own feeds, each feed once",
        )
        poll(  # ticks flow from every feed
            lambda: {n.name: n.get("/health")[1]["exchanges"] for n in nodes},
            lambda h: all(e["ticks"] > 20 for x in h.values() for e in x.values()),
            30,
            "ticks from every feed",
        )
        split_ms = time.time() * 1000
        time.sleep(1.0)
        victim = next(n for n in nodes if FIX in split[n.name])
        survivor = next(n for n in nodes if n is not victim)
        # The records say who read them: since the split, the owner by /health, no one else;
        # before it (na alone, then the rebalance) one reader after the other, never both.
        before = read_topic(kafka_server.bootstrap, kafka["ticks_topic"])
        for name, owned in split.items():
            recent = {r.node for r in before if r.exchange in owned and r.received_ms > split_ms}
            assert recent == {name}, (name, recent)
        for feed in names:
            assert len(owner_runs(before, feed)) <= 2, (feed, owner_runs(before, feed))

        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        t_kill = time.monotonic()
        poll(
            survivor.owned,
            lambda o: sorted(o) == sorted(names),
            20,
            "the survivor owns every feed",
        )
        moved_s = time.monotonic() - t_kill
        assert moved_s < 15, moved_s  # about session_timeout (2 s) plus a rebalance
        kafka_ticks = poll(
            lambda: survivor.get("/health")[1]["exchanges"][FIX]["ticks"],
            lambda t: t > 100,
            30,
            "FIX ticks after the move",
        )
        assert kafka_ticks > 100
        fix.stop()  # freeze the oracle: no trade after this
        want = trade_log(log)

        def fix_ticks() -> Counter[tuple[str, float, int]]:
            return tick_counter(read_topic(kafka_server.bootstrap, kafka["ticks_topic"]), FIX)

        got = poll(fix_ticks, lambda c: c.total() >= want.total(), 30, "all trades published")
        doubled = {t: n for t, n in got.items() if n > 1}
        assert not doubled, f"{len(doubled)} ticks doubled, e.g. {list(doubled.items())[:3]}"
        missing = want - got
        assert not missing, f"{missing.total()} trades missing, e.g. {list(missing)[:3]}"
        assert got == want
        after = read_topic(kafka_server.bootstrap, kafka["ticks_topic"])
        assert owner_runs(after, FIX)[-2:] == [victim.name, survivor.name]
        for sim in sims:  # the JSON feeds moved too (what arrived meanwhile is not there)
            assert any(r.node == survivor.name for r in after if r.exchange == sim.name)
    finally:
        for n in nodes:
            n.stop()
