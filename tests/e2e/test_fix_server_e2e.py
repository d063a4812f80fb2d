"""The FIX market-data server against a real QuickFIX 4.4 initiator (issue 13 point 3).

Two FIX venue simulators feed the daemon; a QuickFIX initiator process (quickfix_consumer.py,
strict data-dictionary validation, FileStore) logs on to the daemon's FIX server and
subscribes to every pair at MarketDepth 1. The test rebuilds the consumer's best bid/offer
from the 35=W / 35=X it reports and checks, in order:

1. a forced gap (the consumer's expected MsgSeqNum lowered) makes QuickFIX send a
   ResendRequest, answered with a GapFill, and the session stays up;
2. a daemon restart (SIGTERM, then started again on the same data dir) ends the session with
   a Logout, and QuickFIX logs on again with its kept numbers, no ResetSeqNumFlag, accepted:
   our Logon answer carries the number after our last one before the restart; after a crash
   (SIGKILL) ours jump ahead instead (never reused), and QuickFIX's ResendRequest gets a
   GapFill;
3. with the venues paused, the consumer's last BBO per symbol equals GET /bbo (prices, sizes,
   venues); with the venues stopped, both are empty (the DELETEs came through).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import PAIRS, daemon_config
from tests.e2e.procs import ROOT, Daemon, Simulator, poll
from tests.harness.services import PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.e2e

Fields = list[tuple[int, str]]
Side = tuple[float, float | None, str] | None  # price, size, venue


class Consumer:
    """The QuickFIX process, driven by lines on stdin, its events read from stdout."""

    def __init__(self, work: Path, port: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        with (work / "stderr.log").open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.e2e.quickfix_consumer", str(work), str(port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, text=True,
            )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):  # a consumer that died has no stdin
                self.command("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)  # stdout at EOF: the reader ends
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def msgs(events: list[dict[str, Any]], direction: str, msg_type: str) -> list[Fields]:
    out = []
    for e in events:
        if e["event"] == direction:
            fields = [(int(t), v) for t, v in e["fields"]]
            if dict(fields).get(35) == msg_type:
                out.append(fields)
    return out


def incoming(events: list[dict[str, Any]]) -> list[Fields]:
    return [[(int(t), v) for t, v in e["fields"]] for e in events if e["event"] == "in"]


def groups(fields: Fields, first: int) -> list[dict[int, str]]:
    """The entries of the NoMDEntries group, split on its first tag."""
    out: list[dict[int, str]] = []
    seen_count = False
    for tag, value in fields:
        if tag == 268:
            seen_count = True
        elif seen_count and tag == first:
            out.append({})
        if out and tag != 10:
            out[-1][tag] = value
    return out


def side(entry: dict[int, str]) -> Side:
    size = entry.get(271)
    return float(entry[270]), None if size is None else float(size), entry[282]


def consumer_bbo(events: list[dict[str, Any]]) -> dict[str, tuple[Side, Side]]:
    """What the consumer holds per symbol: snapshots replace, incrementals apply (depth 1)."""
    book: dict[str, list[Side]] = {}
    for e in events:
        if e["event"] != "in":
            continue
        fields = [(int(t), v) for t, v in e["fields"]]
        kind = dict(fields).get(35)
        if kind == "W":
            levels: list[Side] = [None, None]
            for entry in groups(fields, 269):
                assert entry[290] == "1", fields
                levels[int(entry[269])] = side(entry)
            book[dict(fields)[55]] = levels
        elif kind == "X":
            for entry in groups(fields, 279):
                assert entry[290] == "1", fields
                levels = book.setdefault(entry[55], [None, None])
                gone = entry[279] == "2"
                levels[int(entry[269])] = None if gone else side(entry)
    return {s: (lv[0], lv[1]) for s, lv in book.items()}


def rest_bbo(d: Daemon) -> dict[str, tuple[Side, Side]]:
    status, body = d.get("/bbo")
    assert status == 200, body

    def one(q: dict[str, Any] | None) -> Side:
        return None if q is None else (q["price"], q["size"], q["exchange"])

    return {b["symbol"]: (one(b["bid"]), one(b["ask"])) for b in body["bbo"]}


@dataclass
class Rig:
    venues: list[Simulator]
    daemon: Daemon
    consumer: Consumer | None
    config: dict[str, Any]
    tmp: Path


@pytest.fixture
def rig(
    tmp_path: Path, private_postgres: PostgresServer, private_redis: RedisServer
) -> Iterator[Rig]:
    venues = [
        Simulator(tmp_path, "venue_a", "fix", "--rate", "20", "--comp-id", "VA", "--seed", "1"),
        Simulator(tmp_path, "venue_b", "fix", "--rate", "20", "--comp-id", "VB", "--seed", "2",
                  "--offset", "5e-5", "--depth", "3"),
    ]  # fmt: skip
    config: dict[str, Any] = daemon_config(tmp_path, [], private_postgres, private_redis)
    config["pipeline"] = {**config["pipeline"], "stale_after_s": 30.0}
    fix = {"host": "127.0.0.1", "protocol": "fix", "heartbeat_s": 10}  # paused: alive 20 s
    config["exchanges"] = [
        {"name": "venue_a", "port": venues[0].port, "target_comp_id": "VA", **fix},
        {"name": "venue_b", "port": venues[1].port, "target_comp_id": "VB", "market_depth": 3,
         **fix},
    ]  # fmt: skip
    port = free_port()
    config["fix_server"] = {
        "enabled": True, "port": port, "allowed_comp_ids": ["CONSUMER"], "cadence_ms": 50,
        "logout_timeout_s": 2.0,
    }  # fmt: skip
    r = Rig(venues, Daemon(tmp_path, config), None, config, tmp_path)
    try:
        for v in venues:
            v.start()
        r.daemon.start()
        r.consumer = Consumer(tmp_path / "quickfix", port)
        yield r
    finally:
        if r.consumer is not None:
            r.consumer.stop()
            with (tmp_path / "consumer-events.jsonl").open("w") as out:  # for a failure's story
                out.writelines(json.dumps(e) + "\n" for e in r.consumer.snapshot())
        if r.daemon.proc is not None:
            r.daemon.stop()
        for v in venues:
            if v.proc is not None and v.proc.poll() is None:
                v.proc.send_signal(signal.SIGCONT)
                v.stop()


def count(c: Consumer, direction: str, msg_type: str) -> int:
    return len(msgs(c.snapshot(), direction, msg_type))


@pytest.mark.timeout(120)
def test_quickfix_consumer_gap_restart_and_bbo_equal_to_rest(rig: Rig) -> None:
    c = rig.consumer
    assert c is not None
    poll(c.snapshot, lambda ev: len(msgs(ev, "in", "W")) >= len(PAIRS), 30, "5 snapshots")
    assert [e["event"] for e in c.snapshot()].count("logon") == 1
    x_before = poll(lambda: count(c, "in", "X"), lambda n: n >= 5, 30, "incrementals")

    # 1. A forced gap: QuickFIX expects 3 below what we send next -> ResendRequest, GapFill.
    c.command("gap 3")
    poll(lambda: count(c, "in", "4"), lambda n: n >= 1, 20, "a GapFill")
    events = c.snapshot()
    (resend,) = msgs(events, "out", "2")
    (fill,) = msgs(events, "in", "4")
    gap = next(e for e in events if e["event"] == "gap")
    assert dict(resend)[7] == str(gap["now"])
    assert (dict(fill)[34], dict(fill)[123], dict(fill)[43]) == (str(gap["now"]), "Y", "Y")
    assert int(dict(fill)[36]) > gap["expected"]
    at_fill = next(
        i for i, e in enumerate(events) if e["event"] == "in" and [35, "4"] in e["fields"]
    )
    # what the skipped incrementals said is stale: a fresh snapshot of each pair instead
    poll(lambda: msgs(c.snapshot()[at_fill:], "in", "W"), lambda m: len(m) >= len(PAIRS), 20,
         "fresh snapshots after the GapFill")  # fmt: skip
    poll(lambda: count(c, "in", "X"), lambda n: n > x_before + 5, 20, "incrementals after it")
    assert "logout" not in [e["event"] for e in c.snapshot()]
    assert not msgs(c.snapshot(), "out", "3")  # QuickFIX rejected nothing of ours

    # 2. The daemon restarts: Logout, then QuickFIX logs on again with its kept numbers.
    assert rig.daemon.stop(signal.SIGTERM) == 0
    events = c.snapshot()
    (logout,) = msgs(events, "in", "5")
    assert dict(logout)[58] == "daemon stopping"
    last_in = int(dict(logout)[34])  # the last message we sent before stopping
    last_out = max(int(dict(f)[34]) for e in events if e["event"] == "out"
                   for f in [[(int(t), v) for t, v in e["fields"]]])  # fmt: skip
    n_events = len(events)
    rig.daemon = Daemon(rig.tmp, rig.config)
    rig.daemon.start()
    poll(lambda: [e["event"] for e in c.snapshot()].count("logon"), lambda n: n == 2, 30,
         "a second logon")  # fmt: skip
    later = c.snapshot()[n_events:]
    attempts = msgs(later, "out", "A")  # one a connect attempt while we were down
    (logon_in,) = msgs(later, "in", "A")
    assert all(141 not in dict(a) for a in attempts)  # no reset asked
    # QuickFIX numbers on from its store (each attempt used a number; we ask for those with
    # a ResendRequest and QuickFIX answers with a GapFill)
    assert int(dict(attempts[0])[34]) == last_out + 1
    assert int(dict(logon_in)[34]) == last_in + 1  # we kept ours: no reset, no gap
    poll(lambda: msgs(c.snapshot()[n_events:], "in", "X"), lambda m: len(m) >= 5, 30,
         "incrementals after the restart")  # fmt: skip

    # 2b. A crash (SIGKILL): nothing saved at the end. We resume above every number we sent
    #     (reserved ahead), QuickFIX asks for the gap, gets a GapFill, and the session goes on.
    n_events = len(c.snapshot())
    assert rig.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    rig.daemon = Daemon(rig.tmp, rig.config)
    rig.daemon.start()
    poll(lambda: [e["event"] for e in c.snapshot()].count("logon"), lambda n: n == 3, 30,
         "a logon after the crash")  # fmt: skip
    # What the consumer got from the killed process: everything it logged before the new
    # Logon (messages sent right before the kill still arrive after a snapshot taken then).
    snap = c.snapshot()
    first_logon = next(i for i in range(n_events, len(snap)) if msgs(snap[i : i + 1], "in", "A"))
    sent_before = max(int(dict(f)[34]) for f in incoming(snap[:first_logon]) if 43 not in dict(f))
    (logon_in,) = msgs(c.snapshot()[n_events:], "in", "A")
    assert int(dict(logon_in)[34]) > sent_before + 1  # a jump, never a number reused
    poll(lambda: msgs(c.snapshot()[n_events:], "in", "4"), bool, 20, "a GapFill")
    (resend,) = msgs(c.snapshot()[n_events:], "out", "2")
    assert int(dict(resend)[7]) == sent_before + 1
    poll(lambda: msgs(c.snapshot()[n_events:], "in", "X"), lambda m: len(m) >= 5, 30,
         "incrementals after the crash")  # fmt: skip

    # 3. Venues paused: what the consumer holds equals GET /bbo, every pair quoted.
    for v in rig.venues:
        assert v.proc is not None
        v.proc.send_signal(signal.SIGSTOP)

    def same() -> tuple[dict[str, Any], dict[str, Any]]:
        return consumer_bbo(c.snapshot()), rest_bbo(rig.daemon)

    _, want = poll(same, lambda gw: gw[0] == gw[1], 10, "the consumer's BBO equals GET /bbo")
    assert set(want) == set(PAIRS)
    assert all(bid is not None and ask is not None for bid, ask in want.values()), want
    assert {v for bid, ask in want.values() for v in (bid[2], ask[2])} <= {"venue_a", "venue_b"}

    # ... and stopped: both sides leave the view; the consumer got the deletes.
    for v in rig.venues:
        assert v.proc is not None
        v.proc.send_signal(signal.SIGCONT)
        assert v.stop() == 0
    poll(same, lambda gw: gw[0] == gw[1] and all(
        b is None and a is None for b, a in gw[1].values()), 20, "both empty")  # fmt: skip
    names = [e["event"] for e in c.snapshot()[n_events:]]
    assert "logout" not in names[names.index("logon") :]  # the session stayed up throughout

    health = rig.daemon.get("/health")[1]["fix_server"]
    assert health["sessions"] == 1
    assert health["logons"] == 1  # since this start
    assert health["messages_sent"] >= len(msgs(c.snapshot()[n_events:], "in", "X"))
    assert health["refused"] == {}
    url = f"http://127.0.0.1:{rig.daemon.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
        metrics = resp.read().decode()
    assert "marketflow_fix_server_sessions 1.0" in metrics
    sent = re.search(r"^marketflow_fix_server_messages_sent_total (\S+)$", metrics, re.M)
    assert sent is not None
    assert float(sent.group(1)) >= health["messages_sent"]
