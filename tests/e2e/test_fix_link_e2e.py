"""The FIX feed's link handling as users see it, against a scripted acceptor that records every
message: reconnect backoff, a dead (silent) link probed and reconnected, Logout on SIGTERM."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.e2e.conftest import daemon_config
from tests.e2e.fix_acceptor import FixAcceptor, FixConn
from tests.e2e.procs import Daemon, assert_real_stack, poll
from tests.harness.services import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e

VENUE = "venue"
INITIAL_S, MAX_S = 0.2, 2.0  # reconnect_initial_s, reconnect_max_s of daemon_config
DISCONNECTED = re.compile(
    r"fix_disconnected source=venue error=(.*?) retry_in_s=([\d.]+) failures=(\d+)"
)


@dataclass
class Link:
    acceptor: FixAcceptor
    daemon: Daemon


@pytest.fixture
def link(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[Link]:
    acceptor = FixAcceptor(mode="slam")
    acceptor.start()
    config = daemon_config(tmp_path, [], private_postgres, private_redis)
    pipeline = cast(dict[str, object], config["pipeline"])
    assert (pipeline["reconnect_initial_s"], pipeline["reconnect_max_s"]) == (INITIAL_S, MAX_S)
    config["exchanges"] = [
        {
            "name": VENUE,
            "host": "127.0.0.1",
            "port": acceptor.port,
            "protocol": "fix",
            "sender_comp_id": "MARKETFLOW",
            "target_comp_id": "VENUE",
            "heartbeat_s": 1,  # probed after ~1.2 s of silence, dead after 2 s
            "reset_on_logon": True,  # the acceptor numbers every connection from 1
        }
    ]
    daemon = Daemon(tmp_path, config)
    daemon.start()
    try:
        yield Link(acceptor, daemon)
    finally:
        daemon.stop()
        acceptor.stop()


def disconnects(d: Daemon) -> list[tuple[str, float, int]]:
    return [(e, float(r), int(f)) for e, r, f in DISCONNECTED.findall(d.log())]


@pytest.mark.timeout(120)
def test_fix_backoff_dead_link_reconnect_and_logout_on_sigterm(link: Link) -> None:
    acc, d = link.acceptor, link.daemon
    assert_real_stack(d)

    # 1. A venue that closes every connection: consecutive failures back off exponentially
    #    (initial x 2^(n-1), capped, jitter 0.5-1.0), and the daemon really waits that long.
    conns = poll(acc.snapshot, lambda c: len(c) >= 6, 60, "six connection attempts")
    acc.mode = "silent"
    slammed = [c for c in conns if c.mode == "slam"]
    lines = disconnects(d)[: len(slammed) - 1]
    assert [f for _, _, f in lines] == list(range(1, len(lines) + 1)), lines
    for n, (error, retry_s, failures) in enumerate(lines):
        base = min(MAX_S, INITIAL_S * 2 ** (failures - 1))
        assert 0.5 * base <= retry_s <= base, (failures, retry_s)
        # Closed at once: seen as EOF or as a reset, depending on when the Logon went out.
        assert error == "connection closed by the venue" or "Error" in error, error
        # The next attempt came no sooner than the logged delay (a lower bound: no timing).
        assert slammed[n + 1].accepted_at - slammed[n].accepted_at >= retry_s - 0.01
    assert max(f for _, _, f in lines) >= 5  # the cap of 2.0 s is reached at the 5th failure

    # 2. A venue that logs on and then falls silent: probed with a TestRequest, declared dead
    #    after 2 x HeartBtInt, the connection closed and a new one made (backoff reset).
    def first_silent(cs: list[FixConn]) -> FixConn | None:
        return next((c for c in cs if c.mode == "silent"), None)

    silent = poll(lambda: first_silent(acc.snapshot()), bool, 30, "a silent session")
    assert silent is not None
    acc.mode = "live"
    poll(lambda: silent.eof_at, bool, 30, "the daemon closes the dead link")
    types = silent.types()
    assert types[:2] == [b"A", b"V"], types  # Logon, then the MarketDataRequest
    assert b"1" in types, types  # the TestRequest probe before giving up
    # The daemon logs the disconnect after it has closed the socket: wait for the line.
    dead = poll(
        lambda: [ln for ln in disconnects(d) if ln[0].startswith("LinkDead")],
        bool, 10, f"a LinkDead disconnect in the log (all: {disconnects(d)})",
    )  # fmt: skip
    assert dead[0][2] == 1  # a session that logged on resets the backoff
    assert 0.5 * INITIAL_S <= dead[0][1] <= INITIAL_S

    # 3. A live session: SIGTERM makes the daemon send Logout (35=5) before it closes.
    def live_subscribed(cs: list[FixConn]) -> FixConn | None:
        return next((c for c in cs if c.mode == "live" and b"V" in c.types()), None)

    live = poll(lambda: live_subscribed(acc.snapshot()), bool, 30, "a live, subscribed session")
    assert live is not None
    assert live.number > silent.number
    health = d.get("/health")[1]["exchanges"][VENUE]
    assert health["connected"] is True
    assert health["reconnects"] >= len(slammed)
    d.terminate()
    logout = [m for m in live.received if m[35] == b"5"]
    assert len(logout) == 1, live.types()
    assert (logout[0][49], logout[0][56]) == (b"MARKETFLOW", b"VENUE")
    assert live.types()[-1] == b"5"  # nothing after the Logout
    assert live.eof_at is not None
