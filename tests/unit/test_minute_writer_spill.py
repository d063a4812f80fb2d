"""MinuteWriter: what goes to the spill file and when, what is drained and in which order, and
what close does with what is left (issue 10: the spill paths, on the fakes)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from marketflow.domain.errors import StoreUnavailable
from tests.unit.fakes import FakeSpill, FakeStore, ManualClock
from tests.unit.writer_kit import LOGGER, T0, events, eventually, more_failures, row, writer


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


async def test_rows_spill_after_30_s_of_outage_and_not_a_millisecond_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, spill, clock = FakeStore(), FakeSpill(), ManualClock(T0)
    w = writer(store, spill, clock=clock)  # the default spill_after_s
    await w.start()
    try:
        store.down = True
        w.submit([row(0), row(1)])
        await more_failures(store, 1)
        clock.now_ms = T0 + 29_999
        await more_failures(store, 3)
        assert spill.appends == []
        assert w.status()["down_since_ms"] == T0  # the outage began at the first failure
        clock.now_ms = T0 + 30_000
        await eventually(lambda: spill.appends != [])
        assert spill.appends == [([row(0), row(1)], {})]
        st = w.status()
        assert (st["pending_rows"], st["spilled_rows"]) == (0, 2)
        assert events(caplog, "minute_rows_spilled") == [
            f"minute_rows_spilled path={spill.path} rows=2 total_spilled=2"
        ]
        store.down = False
        await w.flush()
        assert store.calls == [([row(0), row(1)], {})]
        assert (spill.removed, spill.present, w.status()["spilled_rows"]) == (1, False, 0)
    finally:
        await w.aclose()
    assert len(spill.appends) == 1  # nothing left for close to spill


async def test_past_max_in_memory_pending_rows_and_marks_spill_at_once_in_submit_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill, max_in_memory=0)  # taken as 1
    await w.start()
    try:
        store.down = True
        w.submit([row(1)], {"ex1": (1, 10)})
        await more_failures(store, 3)
        assert spill.appends == []  # one row is not over a bound of one
        w.submit([row(0)])
        await eventually(lambda: len(spill.appends) == 1)
        w.submit([row(2)])
        w.submit([row(3)])
        await eventually(lambda: len(spill.appends) == 2)
        assert spill.appends == [([row(1), row(0)], {"ex1": (1, 10)}), ([row(2), row(3)], {})]
        st = w.status()
        assert (st["pending_rows"], st["spilled_rows"]) == (0, 4)
        assert events(caplog, "minute_rows_spilled") == [
            f"minute_rows_spilled path={spill.path} rows=2 total_spilled=2",
            f"minute_rows_spilled path={spill.path} rows=2 total_spilled=4",
        ]
        store.down = False
        await w.flush()
        # The file in order, one row per write (the bound), the marks with the chunk after them.
        assert store.calls == [
            ([row(1)], {}),
            ([row(0)], {}),
            ([row(2)], {"ex1": (1, 10)}),
            ([row(3)], {}),
        ]
        assert store.marks == {"ex1": (1, 10)}
    finally:
        await w.aclose()


async def test_a_spill_left_by_an_earlier_run_is_written_first_in_file_order_in_chunks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, spill = FakeStore(), FakeSpill()
    spill.preload(row(0), row(1), row(2), {"ex1": (1, 10)}, row(3), row(4))
    w = writer(store, spill, max_in_memory=2)
    w.submit([row(5)], {"ex2": (2, 20)})  # submitted before start: written right after the file
    async with asyncio.timeout(5):
        await w.start()
    try:
        assert store.calls == [
            ([row(0), row(1)], {}),
            ([row(2), row(3)], {"ex1": (1, 10)}),
            ([row(4)], {}),
            ([row(5)], {"ex2": (2, 20)}),
        ]
        assert spill.reads == [(0, 2), (2, 2), (5, 2), (6, 2)]
        assert (spill.removed, spill.present) == (1, False)
        st = w.status()
        assert (st["spilled_rows"], st["written_rows"], st["pending_rows"]) == (0, 6, 0)
        assert events(caplog, "minute_spill_found") == [
            f"minute_spill_found path={spill.path} rows=5"
        ]
        assert events(caplog, "minute_spill_written") == [
            f"minute_spill_written path={spill.path} rows=5"
        ]
        w.submit([row(6)])
        await w.flush()
    finally:
        await w.aclose()
    assert store.calls[4:] == [([row(6)], {})]
    assert (spill.removed, spill.appends) == (1, [])  # drained once; nothing spilled at close


async def test_a_spill_found_while_the_store_is_down_is_written_in_the_background_later() -> None:
    store, spill = FakeStore(), FakeSpill()
    spill.preload(row(0))
    store.down = True
    w = writer(store, spill)
    await w.start()
    try:
        st = w.status()
        assert (st["state"], st["spilled_rows"]) == ("down", 1)
        await more_failures(store, 2)  # retried with no submit or flush to prompt it
        store.down = False
        await eventually(lambda: not spill.present)
        assert store.calls == [([row(0)], {})]
        assert w.status()["state"] == "up"
    finally:
        await w.aclose()


async def test_a_row_resubmitted_while_its_spill_is_written_stays_pending_and_comes_after() -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill, max_in_memory=1)
    await w.start()
    try:
        store.down = True
        spill.block = True
        w.submit([row(0, count=1)], {"ex1": (1, 10)})
        w.submit([row(1)])  # two rows, over the bound of one: spilled
        await asyncio.to_thread(spill.appending.wait, 5)
        w.submit([row(0, count=2)], {"ex1": (2, 20)})  # newer versions while the append runs
        spill.release.set()
        await eventually(lambda: w.status()["spilled_rows"] == 2)
        assert spill.appends == [([row(0, count=1), row(1)], {"ex1": (1, 10)})]
        assert w.status()["pending_rows"] == 1
        spill.block = False
        store.down = False
        await w.flush()
        assert store.calls == [
            ([row(0, count=1)], {}),
            ([row(1)], {}),
            ([], {"ex1": (1, 10)}),
            ([row(0, count=2)], {"ex1": (2, 20)}),
        ]
        assert (store.rows[row(0).key].count, store.marks) == (2, {"ex1": (2, 20)})
    finally:
        await w.aclose()


async def test_a_failing_spill_keeps_the_rows_in_memory_and_close_reports_them_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill, max_in_memory=1)
    await w.start()
    store.down = True
    spill.fail_append = OSError("disk full")
    w.submit([row(0), row(1)])
    await eventually(lambda: len(events(caplog, "minute_spill_failed")) >= 2)  # tried again
    assert events(caplog, "minute_spill_failed")[0] == (
        f"minute_spill_failed path={spill.path} rows=2 error=disk full"
    )
    st = w.status()
    assert (st["pending_rows"], st["spilled_rows"], spill.appends) == (2, 0, [])
    assert spill.reads != []  # a failed append may have left rows: the file is read first
    await w.aclose()
    assert events(caplog, "minute_rows_lost") == ["minute_rows_lost rows=2 reason=spill_failed"]
    assert w.status()["pending_rows"] == 2


async def test_close_while_down_spills_rows_and_marks_once_and_later_rows_go_to_the_file(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill)
    await w.start()
    store.down = True
    w.submit([row(0), row(1)], {"ex1": (1, 10)})
    await w.aclose()
    assert spill.appends == [([row(0), row(1)], {"ex1": (1, 10)})]
    st = w.status()
    assert (st["state"], st["pending_rows"], st["spilled_rows"]) == ("down", 0, 2)
    w.submit([row(2)], {"ex1": (2, 20)})
    w.submit([])  # nothing: not even an empty append
    assert spill.appends[1:] == [([row(2)], {"ex1": (2, 20)})]
    assert w.status()["spilled_rows"] == 3
    assert events(caplog, "minute_rows_after_close") == [
        "minute_rows_after_close rows=1 action=spill"
    ]
    with pytest.raises(StoreUnavailable, match=r"^minute writer closed; 3 rows in spill file$"):
        await w.flush()
    await w.aclose()  # twice: nothing more
    assert (len(spill.appends), store.calls) == (2, [])


async def test_a_row_submitted_after_a_clean_close_is_spilled_and_flush_says_so() -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill)
    await w.start()
    w.submit([row(0)])
    await w.aclose()
    assert (store.calls, spill.appends) == ([([row(0)], {})], [])
    w.submit([row(1)])
    assert spill.appends == [([row(1)], {})]
    with pytest.raises(StoreUnavailable, match=r"^minute writer closed; 1 rows in spill file$"):
        await w.flush()


async def test_close_of_a_writer_never_started_writes_rows_and_marks() -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill)
    w.submit([row(0)], {"ex1": (1, 10)})
    w.submit([], {"ex2": (2, 20)})
    await w.aclose()
    marks_only = writer(store, spill)
    marks_only.submit([], {"ex3": (3, 30)})
    await marks_only.aclose()
    assert store.calls == [
        ([row(0)], {"ex1": (1, 10), "ex2": (2, 20)}),
        ([], {"ex3": (3, 30)}),
    ]
    assert (spill.appends, spill.reads) == ([], [])


async def test_close_waits_for_a_write_under_way_and_spills_rows_submitted_during_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill)
    await w.start()
    first = asyncio.Event()
    store.hold = first
    w.submit([row(0)])
    await eventually(lambda: store.holding == 1)  # the background write is under way
    closing = asyncio.create_task(w.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()  # close waits for it
    w.submit([row(1)])
    last = asyncio.Event()
    store.hold = last
    first.set()
    await eventually(lambda: len(store.calls) == 1 and store.holding == 1)  # close's own write
    w.submit([row(2)])
    last.set()
    await closing
    assert store.calls == [([row(0)], {}), ([row(1)], {})]
    assert spill.appends == [([row(2)], {})]
    assert (w.status()["pending_rows"], events(caplog, "minute_rows_lost")) == (0, [])


async def test_a_flush_still_waiting_when_close_ends_fails_with_writer_closed() -> None:
    store, spill = FakeStore(), FakeSpill()
    w = writer(store, spill)
    await w.start()
    store.down = True
    w.submit([row(0)])
    await more_failures(store, 1)
    spill.block = True
    closing = asyncio.create_task(w.aclose())
    await asyncio.to_thread(spill.appending.wait, 5)  # close spills what it could not write
    flushing = asyncio.create_task(w.flush())
    await asyncio.sleep(0)
    spill.release.set()
    await closing
    with pytest.raises(StoreUnavailable, match=r"^minute writer closed$"):
        await flushing
    assert spill.appends == [([row(0)], {})]
