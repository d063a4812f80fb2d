"""File replay: JSONL captures and FIX logs, paced by their own timestamps over a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.adapters.feeds.replay import (
    CHUNK_BYTES,
    ReplayProducer,
    build_file_source,
    detect_format,
)
from marketflow.app.ingest import RunningSource
from marketflow.domain.feeds import FeedStatus
from marketflow.domain.ticks import TickBatch
from marketflow.entrypoints import cli
from marketflow.settings import DEFAULT_PAIRS, ExchangeSettings


def replay_main(argv: list[str]) -> int:
    """``marketflow replay ARGV...`` in this process."""
    return cli.main(["replay", *argv])


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TS = 1795694355187


class FakeTime:
    def __init__(self) -> None:
        self.now_s = 50.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now_s

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(round(delay, 6))
        self.now_s += delay
        await asyncio.sleep(0)


def clock() -> int:
    return TS


def line(price: float, ts: int, symbol: str = "BTCUSDT") -> bytes:
    return b'{"symbol":"%s","price":%r,"timestamp":%d}\n' % (symbol.encode(), price, ts)


async def replay(
    path: Path, speed: float, t: FakeTime | None = None, **kw: Any
) -> tuple[list[Any], FeedStatus, ReplayProducer]:
    t = t or FakeTime()
    producer = ReplayProducer(path, speed, clock, sleep=t.sleep, monotonic=t.monotonic, **kw)
    status = FeedStatus(name="replay", protocol="file")
    queue: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()
    await asyncio.wait_for(producer.run(queue, status), 10)
    items = []
    while not queue.empty():
        item, received_ms = queue.get_nowait()
        assert received_ms == TS
        items.append(item)
    return items, status, producer


async def test_jsonl_keeps_the_capture_spacing_divided_by_speed(tmp_path: Path) -> None:
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(
        line(1.0, TS) + line(2.0, TS, "ETHUSDT")
        + line(3.0, TS + 100)
        + line(4.0, TS + 400) + line(5.0, TS + 400, "SOLUSDT")
    )  # fmt: skip
    t = FakeTime()

    chunks, status, producer = await replay(path, 2.0, t)

    assert t.sleeps == [0.05, 0.15]  # 100 ms and 300 ms of capture at twice the speed
    assert chunks == [
        line(1.0, TS) + line(2.0, TS, "ETHUSDT"),
        line(3.0, TS + 100),
        line(4.0, TS + 400) + line(5.0, TS + 400, "SOLUSDT"),
    ]
    assert producer.units == 5
    assert status.chunks == 3
    assert not status.connected
    assert status.address == str(path)


async def test_slow_motion_and_timestamps_going_backwards(tmp_path: Path) -> None:
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(line(1.0, TS) + line(2.0, TS + 1000) + line(3.0, TS + 500))
    t = FakeTime()

    chunks, _, _ = await replay(path, 0.5, t)

    assert t.sleeps == [2.0]  # half speed; the late-stamped line is due already: no wait
    assert len(chunks) == 3


async def test_max_speed_never_sleeps_and_puts_line_aligned_64k_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    data = b"".join(line(100.0 + i, TS + i) for i in range(20_000))
    path.write_bytes(data)
    t = FakeTime()

    chunks, status, producer = await replay(path, 0.0, t)

    assert t.sleeps == []
    assert b"".join(chunks) == data
    assert all(c.endswith(b"\n") and len(c) <= CHUNK_BYTES for c in chunks)
    assert len(chunks) == pytest.approx(len(data) / CHUNK_BYTES, abs=2)
    assert producer.units == 20_000
    assert status.bytes_in == len(data)


async def test_dirty_capture_reaches_the_parser_untouched(tmp_path: Path) -> None:
    src = FIXTURES / "json" / "dirty.jsonl"
    settings = ExchangeSettings(name="cap", type="file", path=src, speed=1000.0)
    source = build_file_source(settings, DEFAULT_PAIRS, clock)
    assert isinstance(source.parser, JsonLinesParser)
    queue: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()

    await asyncio.wait_for(source.producer.run(queue, source.status), 10)
    count = 0
    while not queue.empty():
        count += source.parser.parse(*queue.get_nowait()).count

    assert count == 4
    assert source.status.rejects.total() == 13


async def test_fix_log_with_soh_goes_through_the_fix_parser_paced_by_sending_time() -> None:
    settings = ExchangeSettings(
        name="fixlog", type="file", path=FIXTURES / "fix" / "incrementals.fix", speed=1.0
    )
    source = build_file_source(settings, DEFAULT_PAIRS, clock)
    assert isinstance(source.parser, FixMarketDataParser)
    producer = source.producer
    assert isinstance(producer, ReplayProducer)
    assert producer.fmt == "fix"
    t = FakeTime()
    producer._sleep, producer._monotonic = t.sleep, t.monotonic  # fake time for this test
    queue: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()

    await asyncio.wait_for(producer.run(queue, source.status), 10)
    frames: list[list[bytes]] = []
    while not queue.empty():
        frames.append(queue.get_nowait()[0])
    batches = [source.parser.parse(f, TS) for f in frames]

    assert all(isinstance(f, list) and f for f in frames)
    assert all(fr.startswith(b"8=FIX.4.4\x01") for f in frames for fr in f)
    assert t.sleeps
    assert all(s == pytest.approx(0.1) for s in t.sleeps)  # 100 ms apart
    assert sum(b.count for b in batches) > 0
    assert source.status.rejects.total() == 0


async def test_pipe_separated_fix_log_one_message_per_line_gives_the_same_frames(
    tmp_path: Path,
) -> None:
    soh = (FIXTURES / "fix" / "incrementals.fix").read_bytes()
    frames = [b"8=FIX" + part for part in soh.split(b"8=FIX")[1:]]
    piped = tmp_path / "session.log"
    piped.write_bytes(b"".join(f.replace(b"\x01", b"|") + b"\r\n" for f in frames) + b"\n")
    assert detect_format(piped.read_bytes()[:4096]) == ("fix", True)

    soh_items, _, _ = await replay(FIXTURES / "fix" / "incrementals.fix", 0.0, fmt="fix")
    pipe_items, status, _ = await replay(piped, 0.0, fmt="fix", pipes=True)

    assert [f for item in pipe_items for f in item] == [f for item in soh_items for f in item]
    assert status.rejects.total() == 0  # checksums hold once '|' is SOH again


async def test_fix_log_skips_session_messages_and_counts_corrupt_ones(tmp_path: Path) -> None:
    logon = (FIXTURES / "fix" / "logon.fix").read_bytes()
    bad = (FIXTURES / "fix" / "bad_checksum.fix").read_bytes()
    path = tmp_path / "mixed.fix"
    path.write_bytes(logon + bad)

    items, status, _ = await replay(path, 0.0, fmt="fix")

    frames = [f for item in items for f in item]
    assert len(frames) == 2  # the logon is not market data; one message has a bad checksum
    assert all(b"\x0135=X\x01" in f for f in frames)
    assert status.rejects.counts == {"bad_checksum": 1}


def test_detect_format_by_first_bytes() -> None:
    assert detect_format(b'{"symbol":"BTCUSDT"}\n') == ("json", False)
    assert detect_format(b"") == ("json", False)
    assert detect_format(b"8=FIX.4.4\x019=5\x01") == ("fix", False)
    assert detect_format(b"20250102-12:00:00.000 : 8=FIX.4.2|9=5|") == ("fix", True)


async def test_missing_file_ends_the_producer_with_the_error_in_status(tmp_path: Path) -> None:
    _, status, _ = await replay(tmp_path / "nope.jsonl", 1.0)

    assert "FileNotFoundError" in status.last_error
    assert not status.connected


async def test_replay_through_the_worker_pool_finishes_by_itself() -> None:
    settings = ExchangeSettings(
        name="cap", type="file", path=FIXTURES / "json" / "simulator_clean.jsonl", speed=0.0
    )
    source = build_file_source(settings, DEFAULT_PAIRS, clock)
    fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
    running = RunningSource(source, fanin, 5, 4)

    await asyncio.wait_for(running.finished(), 10)
    await running.stop()

    assert source.status.ticks == 100
    assert source.status.rejects.total() == 0


def test_cli_max_means_speed_zero_and_calls_bootstrap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import marketflow.bootstrap

    calls: list[tuple[Path, float]] = []

    async def fake_run_replay(settings: object, path: Path, speed: float) -> int:
        calls.append((path, speed))
        return 0

    monkeypatch.setattr(marketflow.bootstrap, "run_replay", fake_run_replay)
    monkeypatch.chdir(tmp_path)  # no ./config.toml here: defaults
    capture = FIXTURES / "json" / "simulator_clean.jsonl"

    assert replay_main([str(capture), "--max"]) == 0
    assert replay_main([str(capture), "--speed", "4"]) == 0
    assert replay_main([str(capture)]) == 0
    assert calls == [(capture, 0.0), (capture, 4.0), (capture, 1.0)]


@pytest.mark.parametrize(
    "argv",
    [
        ["x.jsonl", "--speed", "2", "--max"],
        ["x.jsonl", "--speed", "-1"],
        ["x.jsonl", "--speed", "a"],
        [],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        replay_main(argv)

    assert exc.value.code == 2
    assert "marketflow replay:" in capsys.readouterr().err


def test_cli_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert replay_main([str(tmp_path / "missing.jsonl")]) == 2
    assert "not a readable file" in capsys.readouterr().err
