"""The FIX feed producer against a scripted venue on a loopback socket: nothing applied is lost.

Defect 6 (issue 9): market data in the same read as a Logout or a too-low MsgSeqNum was dropped
although the sequence number had advanced. Defect 9 (FIX part): market data received during the
logout wait was dropped, as was the item being put when the producer was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from marketflow.adapters.feeds.fix_feed import FixFeedProducer, FixItem
from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.fix.codec import FixFramer, parse_fields
from marketflow.adapters.fix.seq_store import SequenceStore
from marketflow.adapters.fix.session import SessionConfig, SessionState
from marketflow.domain.feeds import FeedStatus
from marketflow.domain.ticks import RejectCounts
from marketflow.settings import PipelineSettings
from tests.unit.test_fix_session import md, venue

NOON = 1_735_819_200_000
PIPELINE = PipelineSettings(reconnect_initial_s=5.0, reconnect_max_s=5.0)
LOGON = venue("A", 1, [(98, 0), (108, 10)])


class ScriptedVenue:
    """Answers our Logon with ``on_logon`` and our Logout with ``on_logout``, in one write each."""

    def __init__(self, on_logon: bytes, on_logout: bytes = b"") -> None:
        self.on_logon = on_logon
        self.on_logout = on_logout
        self.received: list[dict[int, bytes]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedVenue:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = FixFramer()
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                for frame in framer.feed(data):
                    assert isinstance(frame, bytes)
                    fields = dict(parse_fields(frame))
                    self.received.append(fields)
                    answer = {b"A": self.on_logon, b"5": self.on_logout}.get(fields[35], b"")
                    if answer:
                        writer.write(answer)
                        await writer.drain()
        writer.close()


def producer(port: int, **kw: object) -> FixFeedProducer:
    config = SessionConfig("MF", "VENUE", ("BTCUSDT",), heartbeat_s=10)
    return FixFeedProducer(
        "venue", "127.0.0.1", port, config, PIPELINE, lambda: NOON,
        logout_wait_s=0.5, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


async def until(cond: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def ticks(items: list[FixItem]) -> int:
    p = FixMarketDataParser("venue", ["BTCUSDT"], RejectCounts())
    return sum(p.parse(item, NOON).count for item in items)


async def run_until_items(
    prod: FixFeedProducer, queue: asyncio.Queue[tuple[FixItem, int]], n: int
) -> list[FixItem]:
    task = asyncio.create_task(prod.run(queue, FeedStatus("venue", "fix", "")))
    try:
        await until(lambda: queue.qsize() >= n)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return [queue.get_nowait()[0] for _ in range(queue.qsize())]


@pytest.mark.parametrize(
    "last",
    [venue("5", 4, [(58, "bye")]), md(2)],  # a Logout; a too-low MsgSeqNum without PossDup
    ids=["logout", "seq_too_low"],
)
async def test_market_data_in_the_same_read_as_the_end_of_the_session_is_kept(
    last: bytes,
) -> None:
    async with ScriptedVenue(LOGON + md(2) + md(3) + last) as v:
        queue: asyncio.Queue[tuple[FixItem, int]] = asyncio.Queue()
        items = await run_until_items(producer(v.port), queue, 1)
    assert ticks(items) == 2
    assert items[0].mark in (4, 5)  # 5 after the Logout at 4, 4 before the too-low 2


async def test_market_data_received_during_the_logout_wait_is_kept() -> None:
    async with ScriptedVenue(LOGON, on_logout=md(2) + venue("5", 3)) as v:
        queue: asyncio.Queue[tuple[FixItem, int]] = asyncio.Queue()
        prod = producer(v.port)
        task = asyncio.create_task(prod.run(queue, FeedStatus("venue", "fix", "")))
        await until(lambda: prod.session is not None and prod.session.md_req_id is not None)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        session = prod.session
        assert session is not None
        assert session.state is SessionState.CLOSED  # the venue answered the Logout
    items = [queue.get_nowait()[0] for _ in range(queue.qsize())]
    assert ticks(items) == 1
    assert items[-1].mark == 4


async def test_item_being_put_when_cancelled_is_put_during_shutdown() -> None:
    async with ScriptedVenue(LOGON + md(2)) as v:
        queue: asyncio.Queue[tuple[FixItem, int]] = asyncio.Queue(1)
        queue.put_nowait((FixItem([]), 0))  # full: the producer blocks on its item
        prod = producer(v.port)
        task = asyncio.create_task(prod.run(queue, FeedStatus("venue", "fix", "")))
        await until(lambda: prod._pending is not None)
        task.cancel()
        await asyncio.sleep(0)  # let the cancellation reach the producer
        queue.get_nowait()  # a worker takes the old item: room for the pending one
        await asyncio.gather(task, return_exceptions=True)
    assert ticks([queue.get_nowait()[0]]) == 1


def test_first_connection_resumes_from_the_mark_then_the_store(tmp_path: Path) -> None:
    store = SequenceStore.for_venue(tmp_path, "venue", "MF", "VENUE")
    assert producer(1, store=store).starting_seqs() == (1, 1)  # nothing anywhere
    store.save(7, 50)
    fresh = SequenceStore.for_venue(tmp_path, "venue", "MF", "VENUE")
    assert producer(1, store=fresh).starting_seqs() == (7, 50)
    marked = producer(1, store=fresh, resume_mark=lambda: 40)
    assert marked.starting_seqs() == (7, 40)  # the core's durable mark wins for inbound
    marked._seqs = (9, 60)  # what the last session ended with
    assert marked.starting_seqs() == (9, 60)


async def test_reconnect_carries_numbers_and_persists_them(tmp_path: Path) -> None:
    store = SequenceStore.for_venue(tmp_path, "venue", "MF", "VENUE")
    async with ScriptedVenue(LOGON + md(2) + venue("5", 3)) as v:
        queue: asyncio.Queue[tuple[FixItem, int]] = asyncio.Queue()
        prod = producer(v.port, store=store)
        await run_until_items(prod, queue, 1)
        logon = v.received[0]
    assert 141 not in logon
    saved = SequenceStore.for_venue(tmp_path, "venue", "MF", "VENUE").load()
    assert saved is not None
    assert saved.next_in == 4
    assert saved.next_out >= 4  # Logon, MarketDataRequest, Logout answer


def test_a_failing_resume_mark_falls_back_to_the_store(tmp_path: Path) -> None:
    store = SequenceStore.for_venue(tmp_path, "venue", "MF", "VENUE")
    store.save(7, 50)

    def broken() -> int | None:
        raise RuntimeError("store down")

    assert producer(1, store=store, resume_mark=broken).starting_seqs() == (7, 50)
