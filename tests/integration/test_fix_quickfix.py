"""The FIX feed (our initiator) against QuickFIX 4.4 (a third-party acceptor) as the venue.

QuickFIX runs in a subprocess (tests/integration/quickfix_venue.py); between it and the feed a
loopback proxy can drop market-data messages or cut the connection, so the gaps are real:
QuickFIX has numbered and stored the messages and must resend them (PossDup) on our
ResendRequest. Every trade QuickFIX numbered for us must be counted exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from marketflow.adapters.feeds.fix_feed import FixFeedProducer, FixItem, build_fix_source
from marketflow.adapters.fix.codec import FixFramer
from marketflow.app.ingest import RunningSource
from marketflow.domain.feeds import Source
from marketflow.domain.ticks import Tick, TickBatch
from marketflow.settings import ExchangeSettings, PipelineSettings
from tests.harness.services import free_port

SYMBOLS = ("BTCUSDT", "ETHUSDT")
PIPELINE = PipelineSettings(reconnect_initial_s=0.1, reconnect_max_s=0.3, stale_after_s=10.0)
pytestmark = pytest.mark.timeout(90)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def until(cond: Callable[[], bool], within_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, f"not in time: {what}"
        await asyncio.sleep(0.02)


class QuickFixVenue:
    """The subprocess, its events, and commands to it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.events: list[dict[str, Any]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.quickfix_venue", str(self.work),
            str(self.port), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        await until(lambda: self.seen("ready") > 0, what="QuickFIX ready")

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            self.events.append(json.loads(line))

    async def command(self, text: str) -> None:
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(text.encode() + b"\n")
        await self._proc.stdin.drain()

    def seen(self, event: str) -> int:
        return sum(1 for e in self.events if e["event"] == event)

    def messages(self, direction: str, msg_type: str) -> list[dict[int, str]]:
        out = []
        for e in self.events:
            if e["event"] == direction:
                fields = {int(t): v for t, v in e["fields"]}
                if fields.get(35) == msg_type:
                    out.append(fields)
        return out

    def trades(self) -> Counter[Tick]:
        return Counter(
            (e["symbol"], e["price"], e["ts"]) for e in self.events if e["event"] == "trade"
        )

    async def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            await self.command("quit")
        try:
            await asyncio.wait_for(self._proc.wait(), 5)
        except TimeoutError:
            self._proc.kill()  # QuickFIX's binding may hang or crash on stop: not our concern
            await self._proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


class Proxy:
    """Forwards feed <-> venue; can drop the venue's new messages until N 35=X are gone, or
    cut the connection."""

    def __init__(self, venue_port: int) -> None:
        self.venue_port = venue_port
        self.port = 0
        self.drop = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.venue_port)
        self._writers += [writer, up_writer]
        up = asyncio.create_task(self._pump(reader, up_writer, filtering=False))
        down = asyncio.create_task(self._pump(up_reader, writer, filtering=True))
        self._tasks |= {up, down}
        await asyncio.gather(up, down, return_exceptions=True)
        self._tasks -= {up, down}

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, filtering: bool
    ) -> None:
        framer = FixFramer()
        try:
            while data := await reader.read(65536):
                if not filtering:
                    writer.write(data)
                    continue
                for frame in framer.feed(data):
                    assert isinstance(frame, bytes)
                    # While dropping, every new message goes (a heartbeat let through would
                    # show the gap early); only market data counts toward ``drop``.
                    if self.drop > 0 and b"\x0143=Y\x01" not in frame:
                        if b"\x0135=X\x01" in frame:
                            self.drop -= 1
                            self.dropped += 1
                        continue
                    writer.write(frame)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()

    def cut(self) -> None:
        for w in self._writers:
            w.close()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Feed:
    def __init__(self, port: int, data_dir: Path) -> None:
        settings = ExchangeSettings(
            name="qfvenue", port=port, protocol="fix", sender_comp_id="MARKETFLOW",
            target_comp_id="QFVENUE", heartbeat_s=5, resend_chunk_size=10,
        )  # fmt: skip
        self.source: Source[FixItem] = build_fix_source(
            settings, SYMBOLS, PIPELINE, now_ms, data_dir=data_dir
        )
        self.fanin: asyncio.Queue[TickBatch] = asyncio.Queue()
        self.running = RunningSource(self.source, self.fanin, 5, 64)  # type: ignore[arg-type]
        self.ticks: Counter[Tick] = Counter()

    def count(self) -> int:
        while not self.fanin.empty():
            self.ticks.update(self.fanin.get_nowait().ticks())
        return sum(self.ticks.values())

    @property
    def producer(self) -> FixFeedProducer:
        assert isinstance(self.source.producer, FixFeedProducer)
        return self.source.producer


async def test_quickfix_gaps_resends_gap_fill_and_reconnect_count_every_trade_once(
    tmp_path: Path,
) -> None:
    venue = QuickFixVenue(tmp_path)
    await venue.start()
    proxy = Proxy(venue.port)
    await proxy.start()
    feed = Feed(proxy.port, tmp_path / "var")
    try:
        await until(lambda: bool(venue.messages("in", "V")), what="MarketDataRequest")
        logon = venue.messages("in", "A")[0]
        assert 141 not in logon  # no ResetOnLogon: QuickFIX keeps the numbers
        await venue.command("publish on")
        await until(lambda: feed.count() >= 20, what="first trades")

        proxy.drop = 15  # a real gap: QuickFIX stored these, it must resend them
        await until(lambda: proxy.dropped == 15, what="messages dropped")
        await until(lambda: feed.producer.session is not None
                    and feed.producer.session.stats.gaps_recovered >= 1, what="resend")  # fmt: skip
        session = feed.producer.session
        assert session is not None
        assert session.stats.resends_applied >= 15
        requests = [(int(m[7]), int(m[16])) for m in venue.messages("in", "2")]
        assert requests[0][1] - requests[0][0] == 9  # chunked: 10 messages at a time
        assert requests[1][0] == requests[0][1] + 1
        assert requests[-1][1] == 0  # and the rest in one open-ended request

        await venue.command("skip 5")  # numbers QuickFIX never used: it answers with a GapFill
        await until(lambda: session.stats.gaps_recovered >= 2, what="gap fill")
        assert any(m.get(123) == "Y" for m in venue.messages("out", "4"))

        logons = len(venue.messages("in", "A"))
        proxy.drop = 3  # in flight when the link dies: recovered after the reconnect
        await until(lambda: proxy.dropped == 18, what="dropped before the cut")
        proxy.cut()
        await until(lambda: len(venue.messages("in", "A")) > logons, what="re-logon")
        relogon = venue.messages("in", "A")[-1]
        assert 141 not in relogon
        assert int(relogon[34]) > int(logon[34])  # our numbers carried over
        await until(lambda: feed.producer.session is not session
                    and feed.producer.session is not None
                    and feed.producer.session.stats.resends_applied >= 3,
                    what="resend after reconnect")  # fmt: skip
        await until(lambda: feed.count() >= len(venue.trades()) // 2 + 20, what="more trades")

        await venue.command("publish off")
        await until(lambda: venue.seen("published_off") > 0, what="publisher stopped")
        await until(lambda: feed.count() >= sum(venue.trades().values()), what="all trades")
        await asyncio.sleep(0)
        assert feed.count() == sum(venue.trades().values())
        assert feed.ticks == venue.trades()
        counts = feed.source.status.rejects.counts
        assert "seq_gap" not in counts  # nothing was skipped: every gap was resent or filled
        assert not venue.messages("out", "3")  # QuickFIX rejected nothing we sent
        out_logouts = [m.get(58) for m in venue.messages("out", "5")]
        assert not any("too low" in (t or "") for t in out_logouts)
    finally:
        await feed.running.stop()
        await proxy.stop()
        await venue.stop()
