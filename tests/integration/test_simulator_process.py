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


def read_for(s: socket.socket, seconds: float) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = s.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data[: data.rfind(b"\n") + 1])


def rows(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in data.splitlines()]


def test_lines_parse_and_come_as_five_pairs_every_100_ms(simulator: Simulator) -> None:
    with connect(simulator.port) as s:
        data = read_for(s, 1.25)

    parser = JsonLinesParser("exchange1", frozenset(DEFAULT_PAIRS), RejectCounts())
    batch = parser.parse(data, time.time_ns() // 1_000_000)
    assert parser.rejects.total() == 0
    assert batch.count == len(data.splitlines())
    rounds = [list(g) for _, g in groupby(rows(data), key=lambda r: r["timestamp"])]
    assert 10 <= len(rounds) <= 14  # 50 lines/s
    assert all([r["symbol"] for r in rnd] == list(DEFAULT_PAIRS) for rnd in rounds)
    stamps = [rnd[0]["timestamp"] for rnd in rounds]
    gaps = [b - a for a, b in pairwise(stamps)]
    assert all(80 <= g <= 130 for g in gaps), gaps
    now_ms = time.time_ns() // 1_000_000
    assert abs(now_ms - stamps[-1]) < 2000  # wall clock, epoch ms


def test_two_clients_share_one_price_walk(simulator: Simulator) -> None:
    with connect(simulator.port) as a, connect(simulator.port) as b:
        time.sleep(0.05)
        data_a = read_for(a, 0.6)
        data_b = read_for(b, 0.3)

    by_ts_a = {(r["timestamp"], r["symbol"]): r["price"] for r in rows(data_a)}
    keyed_b = [((r["timestamp"], r["symbol"]), r["price"]) for r in rows(data_b)]
    common = [(k, p) for k, p in keyed_b if k in by_ts_a]
    assert len(common) >= 5
    assert all(by_ts_a[k] == p for k, p in common)


def test_first_port_prices_and_seed_repeat(simulator: Simulator) -> None:
    with connect(simulator.port) as s:
        first = rows(read_for(s, 0.35))[:5]

    assert [r["symbol"] for r in first] == list(DEFAULT_PAIRS)
    btc = first[0]["price"]
    assert isinstance(btc, float)
    assert 99_000 < btc < 101_000  # another port than 4010x: 40101's prices


def test_stop_with_sigterm_then_restart_on_the_same_port(simulator: Simulator) -> None:
    with connect(simulator.port) as s:
        assert read_for(s, 0.3)
        assert simulator.stop(signal.SIGTERM) == 0
        while s.recv(1 << 16):  # the process is gone: its connections end (EOF)
            pass

    simulator.start()
    with connect(simulator.port) as s:
        assert rows(read_for(s, 0.35))


def test_sigint_exits_cleanly(simulator: Simulator) -> None:
    assert simulator.stop(signal.SIGINT) == 0


def test_rate_option_gives_far_more_lines() -> None:
    sim = Simulator(free_port(), "--rate", "200000")
    sim.start()
    try:
        with connect(sim.port) as s:
            data = read_for(s, 1.0)
    finally:
        assert sim.stop() == 0

    lines = data.count(b"\n")
    assert lines > 20_000, lines
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
