"""``python -m marketflow.simulator`` as a user runs it: a real process on a free port."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import groupby, pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.domain.ticks import RejectCounts
from marketflow.settings import DEFAULT_PAIRS
from tests.harness.services import free_port
from tests.harness.walk_oracle import walk_rounds

ROOT = Path(__file__).resolve().parents[2]


class Simulator:
    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.argv = [sys.executable, "-m", "marketflow.simulator", "--port", str(port), *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        pytest.fail("simulator did not start listening")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    sim = Simulator(free_port(), "--seed", "11")
    sim.start()
    yield sim
    sim.stop()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


NL = b"\n"


def read_lines(s: socket.socket, n: int, timeout: float = 15.0) -> bytes:
    """At least ``n`` whole lines (whatever arrived by then, cut at the last newline)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while data.count(NL) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {bytes(data).count(NL)} of {n} lines in {timeout} s"
        s.settimeout(left)
        chunk = s.recv(1 << 16)
        assert chunk, "the simulator closed the connection"
        data += chunk
    return bytes(data[: data.rfind(b"\n") + 1])


def rows(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in data.splitlines()]


def test_lines_parse_and_come_as_five_pairs_one_round_per_100_ms_at_most(
    simulator: Simulator,
) -> None:
    with connect(simulator.port) as s:
        data = read_lines(s, 12 * 5)

    parser = JsonLinesParser("exchange1", frozenset(DEFAULT_PAIRS), RejectCounts())
    batch = parser.parse(data, time.time_ns() // 1_000_000)
    assert parser.rejects.total() == 0
    assert batch.count == len(data.splitlines())
    rounds = [list(g) for _, g in groupby(rows(data), key=lambda r: r["timestamp"])]
    # One round (one line per pair, in order) per timestamp: a late wake-up never bursts.
    assert all([r["symbol"] for r in rnd] == list(DEFAULT_PAIRS) for rnd in rounds[:-1])
    stamps = [rnd[0]["timestamp"] for rnd in rounds]
    assert all(b > a for a, b in pairwise(stamps)), stamps
    # On a 100 ms schedule: n rounds never span less than ~(n - 2) x 100 ms (load only
    # makes the span longer, so no upper bound here).
    assert stamps[-1] - stamps[0] >= (len(stamps) - 2) * 100 - 20, stamps
    now_ms = time.time_ns() // 1_000_000
    assert abs(now_ms - stamps[-1]) < 60_000  # wall clock in epoch ms (not s, not us)


def test_two_clients_share_one_price_walk(simulator: Simulator) -> None:
    with connect(simulator.port) as a, connect(simulator.port) as b:
        data_a = read_lines(a, 30)
        data_b = read_lines(b, 15)

    by_ts_a = {(r["timestamp"], r["symbol"]): r["price"] for r in rows(data_a)}
    keyed_b = [((r["timestamp"], r["symbol"]), r["price"]) for r in rows(data_b)]
    common = [(k, p) for k, p in keyed_b if k in by_ts_a]
    assert len(common) >= 5
    assert all(by_ts_a[k] == p for k, p in common)


def first_rounds(port: int, seed: int, n: int) -> list[list[float]]:
    sim = Simulator(port, "--seed", str(seed))
    sim.start()
    try:
        with connect(port) as s:
            got = rows(read_lines(s, n * 5))[: n * 5]
    finally:
        assert sim.stop() == 0
    assert [r["symbol"] for r in got] == list(DEFAULT_PAIRS) * n
    return [[r["price"] for r in got[i * 5 : i * 5 + 5]] for i in range(n)]


def test_first_port_prices_and_seed_repeat() -> None:
    """Two runs with one seed send the same walk from its start; another seed another walk.
    A port other than 4010x starts at 40101's prices (the oracle is kept in the test)."""
    run1 = first_rounds(free_port(), 11, 4)
    run2 = first_rounds(free_port(), 11, 4)
    other = first_rounds(free_port(), 12, 1)

    assert run1 == run2 == walk_rounds(40101, seed=11, rounds=4)
    assert other[0] != run1[0]
    assert other == walk_rounds(40101, seed=12, rounds=1)
    assert 99_000 < run1[0][0] < 101_000  # BTCUSDT near 40101's 100000.0


def test_stop_with_sigterm_then_restart_on_the_same_port(simulator: Simulator) -> None:
    with connect(simulator.port) as s:
        assert read_lines(s, 5)
        assert simulator.stop(signal.SIGTERM) == 0
        while s.recv(1 << 16):  # the process is gone: its connections end (EOF)
            pass

    simulator.start()
    with connect(simulator.port) as s:
        assert rows(read_lines(s, 5))


def test_sigint_exits_cleanly(simulator: Simulator) -> None:
    assert simulator.stop(signal.SIGINT) == 0


def test_rate_option_builds_many_rounds_per_timestamp() -> None:
    """At 200 000 lines/s the simulator builds the rounds of a 5 ms slice at once (one
    timestamp); 20 000 lines arrive well within a deadline that the default 50 lines/s could
    never meet (throughput figures: bench/ingest.py)."""
    sim = Simulator(free_port(), "--rate", "200000")
    sim.start()
    try:
        with connect(sim.port) as s:
            data = read_lines(s, 20_000, timeout=60)  # 400 s at the default 50 lines/s
    finally:
        assert sim.stop() == 0

    lines = data.count(b"\n")
    per_stamp = [len(list(g)) for _, g in groupby(rows(data), key=lambda r: r["timestamp"])]
    assert max(per_stamp) > 5, per_stamp[:20]  # several rounds in one slice, not one
    parser = JsonLinesParser("x", frozenset(DEFAULT_PAIRS), RejectCounts())
    assert parser.parse(data, time.time_ns() // 1_000_000).count == lines
    assert parser.rejects.total() == 0


def test_help_prints_usage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "marketflow.simulator", "--help"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert b"--rate" in out.stdout
    assert b"--protocol" in out.stdout
