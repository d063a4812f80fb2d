"""The FIX feed against the in-process FIX venue simulator, through the real ingest pipeline."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from marketflow.adapters.feeds.fix_feed import FixFeedProducer, FixItem, build_fix_source
from marketflow.app.ingest import RunningSource
from marketflow.domain.feeds import Source
from marketflow.domain.ticks import Tick, TickBatch
from marketflow.settings import DEFAULT_PAIRS, ExchangeSettings, PipelineSettings
from marketflow.simulator.fix_venue import FixVenue

PIPELINE = PipelineSettings(reconnect_initial_s=0.05, reconnect_max_s=0.3, stale_after_s=3.0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def until(cond: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def logged_trades(path: Path) -> Counter[Tick]:
    rows = (orjson.loads(line) for line in path.read_bytes().splitlines())
    return Counter((r["symbol"], r["price"], r["timestamp"]) for r in rows)


class Pipeline:
    """A FIX source running in the real ingest pipeline, collecting every batch."""

    def __init__(
        self,
        port: int,
        data_dir: Path,
        resume_mark: Callable[[], int | None] = lambda: None,
        **options: Any,
    ) -> None:
        settings = ExchangeSettings(
            name="fixvenue", port=port, protocol="fix", heartbeat_s=1, **options
        )
        self.source: Source[FixItem] = build_fix_source(
            settings, DEFAULT_PAIRS, PIPELINE, now_ms, data_dir=data_dir, resume_mark=resume_mark
        )
        self.fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
        self.running = RunningSource(self.source, self.fanin, 5, 64)  # type: ignore[arg-type]
        self.ticks: Counter[Tick] = Counter()
        self.batches: list[TickBatch] = []
        self.books = 0

    def collect(self) -> int:
        while not self.fanin.empty():
            batch = self.fanin.get_nowait()
            self.batches.append(batch)
            self.ticks.update(batch.ticks())
            self.books += len(batch.books)
        return sum(self.ticks.values())

    @property
    def producer(self) -> FixFeedProducer:
        assert isinstance(self.source.producer, FixFeedProducer)
        return self.source.producer


@pytest.fixture
def trade_log(tmp_path: Path) -> Path:
    return tmp_path / "trades.jsonl"


async def test_session_is_held_and_survives_a_venue_restart(
    trade_log: Path, tmp_path: Path
) -> None:
    venue = FixVenue(port=0, rate=300, seed=1, trade_log=trade_log)
    await venue.start()
    feed = Pipeline(venue.port, tmp_path)
    await until(lambda: feed.collect() > 50)
    await asyncio.sleep(2.5)  # > 2 x HeartBtInt: heartbeats keep the session up
    status = feed.source.status
    assert status.connected
    assert status.connect_attempts == 1
    assert status.reconnects == 0

    await venue.stop()
    await until(lambda: not status.connected)
    before = feed.collect()
    venue = FixVenue(port=venue.port, rate=300, seed=2, trade_log=trade_log)
    await venue.start()
    await until(lambda: feed.collect() > before + 50)
    assert status.reconnects >= 1
    assert feed.books > 0

    await venue.stop()  # first the venue: every trade it logged has reached us
    await until(lambda: not status.connected)
    await feed.running.stop()
    feed.collect()
    assert feed.ticks == logged_trades(trade_log)
    # A new venue process starts its numbering again: followed (and counted), not fought.
    assert set(status.rejects.counts) == {"logon_seq_lower"}


async def test_forced_gaps_are_recovered_by_resend_and_lose_no_trade(
    trade_log: Path, tmp_path: Path
) -> None:
    async with FixVenue(port=0, rate=400, seed=3, gap_every=25, trade_log=trade_log) as venue:
        feed = Pipeline(venue.port, tmp_path)
        await until(lambda: feed.collect() > 300)
        session = feed.producer.session
        assert session is not None
        await until(lambda: session.stats.gaps_recovered >= 3)
        assert session.stats.resends_applied >= 3
        assert session.stats.resubscribes == 0
        assert feed.source.status.connect_attempts == 1
    await until(lambda: not feed.source.status.connected)
    await feed.running.stop()
    feed.collect()
    assert feed.ticks == logged_trades(trade_log)
    assert not feed.source.status.rejects.counts  # no seq_gap: nothing was skipped


async def test_venue_that_cannot_resend_gets_the_snapshot_fallback(
    trade_log: Path, tmp_path: Path
) -> None:
    async with FixVenue(
        port=0, rate=400, seed=4, gap_every=25, trade_log=trade_log, resend=False
    ) as venue:
        feed = Pipeline(venue.port, tmp_path)
        await until(lambda: feed.collect() > 300)
        session = feed.producer.session
        assert session is not None
        await until(lambda: session.stats.gaps_abandoned >= 2)
        assert session.stats.resubscribes >= 1
    await until(lambda: not feed.source.status.connected)
    await feed.running.stop()
    feed.collect()
    # The dropped messages never reached us, and the log holds only trades written: equal.
    assert feed.ticks == logged_trades(trade_log)
    assert "seq_gap" in feed.source.status.rejects.counts


async def test_restart_resumes_from_the_durable_mark_exactly(
    trade_log: Path, tmp_path: Path
) -> None:
    """Promise 5: after a crash the venue is asked for exactly what was not yet durable."""
    async with FixVenue(port=0, rate=400, seed=5, gap_every=40, trade_log=trade_log) as venue:
        first = Pipeline(venue.port, tmp_path)
        await until(lambda: first.collect() > 200)
        await first.running.stop()  # the daemon goes away; the venue keeps the session
        first.collect()
        durable = first.batches[: len(first.batches) // 2]  # the rest was lost in the crash
        mark = max(b.mark for b in durable if b.mark is not None)
        seq_file = tmp_path / "fix" / "fixvenue.seq"
        assert orjson.loads(seq_file.read_bytes())["next_in"] > mark  # the store is ahead
        second = Pipeline(venue.port, tmp_path, resume_mark=lambda: mark)
        await until(lambda: second.collect() > 200)
        session = second.producer.session
        assert session is not None
        assert session.stats.resends_applied > 0
    await until(lambda: not second.source.status.connected)
    await second.running.stop()
    second.collect()
    ticks: Counter[Tick] = Counter()
    for batch in durable:
        ticks.update(batch.ticks())
    ticks.update(second.ticks)
    assert ticks == logged_trades(trade_log)  # every trade once: none lost, none twice
    logons = [m for m in venue.sessions.values()]
    assert len(logons) == 1  # one session throughout: no 141=Y reset


async def test_shutdown_logs_out(trade_log: Path, tmp_path: Path) -> None:
    async with FixVenue(port=0, rate=100, trade_log=trade_log) as venue:
        feed = Pipeline(venue.port, tmp_path)
        await until(lambda: feed.collect() > 5)
        session = feed.producer.session
        assert session is not None
        await feed.running.stop()
        assert session.closed  # the venue answered our Logout
        assert not feed.source.status.connected


async def test_nothing_listening_is_retried_with_backoff(tmp_path: Path) -> None:
    async with FixVenue(port=0) as probe:
        port = probe.port
    feed = Pipeline(port, tmp_path)
    await until(lambda: feed.source.status.connect_attempts >= 3)
    assert "Connect" in feed.source.status.last_error or "refused" in feed.source.status.last_error
    await feed.running.stop()
