"""MinuteWriter: what flush promises, retries and their backoff, what is logged and counted
(issue 10, on the fakes)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping, Sequence

import pytest

from marketflow.app.minute_writer import MinuteWriter
from marketflow.backoff import Backoff
from marketflow.domain.aggregates import Mark, MinuteRow
from marketflow.domain.errors import StoreUnavailable
from tests.unit.fakes import FakeSpill, FakeStore, ManualClock
from tests.unit.writer_kit import LOGGER, T0, all_events, events, eventually, row, writer

Calls = list[tuple[list[MinuteRow], dict[str, Mark]]]


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


def store_down_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The retry delay each ``minute_store_down`` line announced."""
    return [
        float(r.args[4])  # type: ignore[index,arg-type]
        for r in caplog.records
        if r.name == LOGGER and r.getMessage().startswith("minute_store_down ")
    ]


async def test_a_new_writer_reports_up_with_nothing_pending_spilled_or_written() -> None:
    spill = FakeSpill()
    assert writer(FakeStore(), spill).status() == {
        "state": "up",
        "kind": "fake",
        "spill_path": str(spill.path),
        "pending_rows": 0,
        "spilled_rows": 0,
        "written_rows": 0,
        "last_error": None,
        "down_since_ms": None,
    }


async def test_flush_before_start_returns_with_nothing_submitted_and_asks_for_start_otherwise() -> (
    None
):
    store = FakeStore()
    w = writer(store, FakeSpill())
    await w.flush()
    w.submit([])
    w.submit([], {})
    await w.flush()  # empty submits are nothing to wait for
    w.submit([row(0)])
    with pytest.raises(RuntimeError, match=r"^MinuteWriter\.flush\(\) needs start\(\) first$"):
        await w.flush()
    await w.start()
    try:
        await w.flush()
        assert store.calls == [([row(0)], {})]
    finally:
        await w.aclose()


async def test_start_runs_one_background_task_named_minute_writer_until_close() -> None:
    w = writer(FakeStore(), FakeSpill())
    await w.start()
    await w.start()
    try:
        named = [t for t in asyncio.all_tasks() if t.get_name() == "minute-writer"]
        assert len(named) == 1
    finally:
        await w.aclose()
    assert named[0].done()


async def test_rows_and_marks_are_written_in_the_background_in_submit_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore()
    w = writer(store, FakeSpill())
    await w.start()
    try:
        w.submit([row(0)])
        await eventually(lambda: len(store.calls) == 1)
        w.submit([row(2), row(1)])
        w.submit([row(2, count=5)])  # a later version replaces the one not yet written
        await eventually(lambda: len(store.calls) == 2)
        w.submit([], {"ex1": (1, 10)})
        await eventually(lambda: len(store.calls) == 3)
        assert store.calls == [
            ([row(0)], {}),
            ([row(2, count=5), row(1)], {}),
            ([], {"ex1": (1, 10)}),
        ]
        assert w.status()["written_rows"] == 3
        assert all_events(caplog) == []  # never down: nothing to say
    finally:
        await w.aclose()


async def test_the_newest_mark_per_source_is_written_and_an_older_one_never_replaces_it() -> None:
    store = FakeStore()
    w = writer(store, FakeSpill())
    w.submit([], {"ex1": (1, 200)})
    w.submit([], {"ex1": (2, 100)})  # older: ignored
    w.submit([], {"ex1": (3, 200), "ex2": (1, 50)})  # as new: the later one wins
    w.submit([], {"ex1": (4, 150)})
    await w.start()
    try:
        await w.flush()
        assert store.calls == [([], {"ex1": (3, 200), "ex2": (1, 50)})]
    finally:
        await w.aclose()


async def test_flush_returns_only_once_a_write_under_way_has_landed() -> None:
    store = FakeStore()
    w = writer(store, FakeSpill())
    await w.start()
    try:
        hold = asyncio.Event()
        store.hold = hold
        w.submit([row(0)])
        await eventually(lambda: store.holding == 1)  # out of memory, not yet in the store

        async def flushed() -> Calls:
            await w.flush()
            return list(store.calls)

        flushing = asyncio.create_task(flushed())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        hold.set()
        async with asyncio.timeout(5):
            assert await flushing == [([row(0)], {})]
    finally:
        await w.aclose()


async def test_each_of_two_flushes_returns_once_its_own_rows_are_stored() -> None:
    store = FakeStore()
    w = writer(store, FakeSpill())
    await w.start()
    try:
        first = asyncio.Event()
        store.hold = first
        w.submit([row(0)])
        await eventually(lambda: store.holding == 1)

        async def flushed() -> Calls:
            await w.flush()
            return list(store.calls)

        a = asyncio.create_task(flushed())
        await asyncio.sleep(0)
        w.submit([row(1)])
        b = asyncio.create_task(flushed())
        await asyncio.sleep(0)
        second = asyncio.Event()
        store.hold = second
        first.set()
        async with asyncio.timeout(5):
            assert await a == [([row(0)], {})]
            await eventually(lambda: store.holding == 1)
            assert not b.done()  # its row is still on the way
            second.set()
            assert await b == [([row(0)], {}), ([row(1)], {})]
    finally:
        await w.aclose()


async def test_every_failed_attempt_is_logged_with_its_delay_and_the_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, clock = FakeStore(), ManualClock(T0)
    retry = Backoff(10.0, 10.0, random.Random(7))
    w = writer(store, FakeSpill(), clock=clock, retry=retry)
    await w.start()
    try:
        store.down = True
        w.submit([row(0), row(1)])
        await eventually(lambda: store.failures == 1)
        clock.now_ms = T0 + 5_000
        for _ in range(2):  # a flush cuts the 5-10 s backoff short: one failing attempt each
            async with asyncio.timeout(3):
                with pytest.raises(StoreUnavailable, match=r"^fake store is down$"):
                    await w.flush()
        assert store.failures == 3
        same = Backoff(10.0, 10.0, random.Random(7))
        assert events(caplog, "minute_store_down") == [
            f"minute_store_down kind=fake attempt={n} pending=2 spilled=0 "
            f"retry_in_s={same.fail():.2f} error=fake store is down"
            for n in (1, 2, 3)
        ]
        st = w.status()
        assert (st["state"], st["down_since_ms"], st["last_error"], st["pending_rows"]) == (
            "down",
            T0,
            "fake store is down",
            2,
        )
        store.down = False
        async with asyncio.timeout(3):
            await w.flush()
        assert store.calls == [([row(0), row(1)], {})]
        assert events(caplog, "minute_store_up") == [
            "minute_store_up kind=fake after_attempts=3 written=2"
        ]
        st = w.status()
        assert (st["state"], st["down_since_ms"], st["written_rows"], st["pending_rows"]) == (
            "up",
            None,
            2,
            0,
        )
        assert retry.failures == 0  # the next outage starts from the first delay again
    finally:
        await w.aclose()


async def test_an_unexpected_store_error_fails_the_flush_with_its_type_and_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore()
    real = store.upsert_minutes
    calls = 0

    async def flaky(rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        await real(rows, marks)

    store.upsert_minutes = flaky  # type: ignore[method-assign]
    w = writer(store, FakeSpill(), retry=Backoff(10.0, 10.0, random.Random(3)))
    w.submit([row(0)])
    await w.start()  # no spill file: the background task makes the first attempt
    try:
        with pytest.raises(StoreUnavailable, match=r"^RuntimeError: bug$"):
            await w.flush()
        st = w.status()
        assert (st["state"], st["last_error"], st["pending_rows"]) == (
            "down",
            "RuntimeError: bug",
            1,
        )
        failed = [r for r in caplog.records if r.getMessage() == "minute_write_failed kind=fake"]
        assert [(r.levelno, r.exc_info is not None) for r in failed] == [(logging.ERROR, True)]
        [down] = events(caplog, "minute_store_down")
        assert down.startswith("minute_store_down kind=fake attempt=1 pending=1 spilled=0 ")
        assert down.endswith(" error=RuntimeError: bug")
        async with asyncio.timeout(3):
            await w.flush()  # cuts the 5-10 s backoff short
        assert store.calls == [([row(0)], {})]
    finally:
        await w.aclose()


async def test_without_a_retry_policy_delays_start_at_a_quarter_second_and_stop_at_4_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore()
    w = MinuteWriter(store, FakeSpill(), 1000, ManualClock(T0))
    await w.start()
    try:
        store.down = True
        w.submit([row(0)])
        await eventually(lambda: store.failures == 1)
        while store.failures < 24:
            async with asyncio.timeout(3):
                with pytest.raises(StoreUnavailable):
                    await w.flush()
        delays = store_down_delays(caplog)
        assert len(delays) == store.failures
        assert 0.125 <= delays[0] <= 0.25
        assert 0.25 <= delays[1] <= 0.5
        assert all(2.0 <= d <= 4.0 for d in delays[4:])  # capped at 4 s, half kept
    finally:
        await w.aclose()


async def test_a_flush_fails_instead_of_hanging_when_the_background_task_has_died() -> None:
    store = FakeStore()
    w = writer(store, FakeSpill())
    await w.start()
    task = w._task
    assert task is not None
    hold = asyncio.Event()
    store.hold = hold
    w.submit([row(0)])
    await eventually(lambda: store.holding == 1)
    waiting = asyncio.create_task(w.flush())
    await asyncio.sleep(0)
    task.cancel()  # as a bug escaping the task would end it
    async with asyncio.timeout(5):
        with pytest.raises(StoreUnavailable, match=r"^minute writer stopped: CancelledError$"):
            await waiting
        with pytest.raises(StoreUnavailable, match=r"^minute writer stopped$"):
            await w.flush()
    hold.set()
    await w.aclose()  # what the task held is written at close
    assert store.calls == [([row(0)], {})]
