"""MinuteWriter on a dict-backed fake store that can be switched down."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import orjson
import pytest

from marketflow.adapters.spill_file import JsonlSpillFile
from marketflow.app.minute_writer import MinuteWriter
from marketflow.backoff import Backoff
from marketflow.domain.aggregates import History, Mark, MinuteRow
from marketflow.domain.errors import StoreUnavailable

M0 = 1_700_000_040_000


class FakeStore:
    """A MinuteStore in a dict, with a switch for outages and a log of every batch."""

    kind = "fake"

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int], MinuteRow] = {}
        self.down = False
        self.batches: list[list[MinuteRow]] = []
        self.failures = 0

    identity = "fake"

    async def upsert_minutes(
        self, rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None
    ) -> None:
        await asyncio.sleep(0)  # a real store yields; so must the fake
        if self.down:
            self.failures += 1
            raise StoreUnavailable("fake: connection refused")
        self.batches.append(list(rows))
        for r in rows:
            self.rows[r.key] = r

    async def history(
        self, symbol: str, before: Mapping[str, int], since_ms: int | None = None
    ) -> History:
        return History(None)

    async def load_marks(self) -> dict[str, Mark]:
        return {}

    async def newest_minute_ms(self) -> int | None:
        return max((r.minute_ms for r in self.rows.values()), default=None)

    async def minutes_since(self, since_ms: int) -> list[MinuteRow]:
        return [r for r in self.rows.values() if r.minute_ms >= since_ms]

    async def ping(self) -> bool:
        return not self.down

    async def aclose(self) -> None:
        return None


def row(i: int, count: int = 3, exchange: str = "exchange1") -> MinuteRow:
    return MinuteRow(exchange, "BTCUSDT", M0 + i * 60_000, 100.0 + i, 99.0, 101.0 + i, count)


def clock() -> int:
    return 1_700_000_000_000


def make_writer(store: FakeStore, path: Path, max_in_memory: int = 1000) -> MinuteWriter:
    return MinuteWriter(
        store,
        JsonlSpillFile(path),
        max_in_memory,
        clock,
        retry=Backoff(0.01, 0.05, random.Random(1)),
    )


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    return tmp_path / "spill" / "minutes.jsonl"


@pytest.fixture
async def writer(store: FakeStore, spill: Path) -> AsyncIterator[MinuteWriter]:
    w = make_writer(store, spill)
    await w.start()
    yield w
    await w.aclose()


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for a condition the writer's background task brings about."""
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


async def wait_until_down(w: MinuteWriter, store: FakeStore, failures: int = 1) -> None:
    await eventually(lambda: w.status()["state"] == "down" and store.failures >= failures)


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def exists(path: Path) -> bool:
    return path.exists()  # tiny local file check: blocking is harmless in a test


async def test_submitted_rows_are_written_in_one_batch(
    writer: MinuteWriter, store: FakeStore
) -> None:
    writer.submit([row(0), row(1), row(2)])
    await writer.flush()
    assert store.rows == {r.key: r for r in (row(0), row(1), row(2))}
    assert len(store.batches) == 1
    st = writer.status()
    assert (st["state"], st["kind"], st["pending_rows"], st["written_rows"]) == ("up", "fake", 0, 3)


async def test_later_version_of_a_minute_replaces_the_earlier_one_before_writing(
    writer: MinuteWriter, store: FakeStore
) -> None:
    store.down = True
    writer.submit([row(0, count=1)])
    writer.submit([row(0, count=2)])
    await wait_until_down(writer, store)
    assert writer.status()["pending_rows"] == 1
    store.down = False
    await writer.flush()
    assert store.rows[row(0).key].count == 2
    assert sum(len(b) for b in store.batches) == 1


async def test_store_down_keeps_rows_reports_down_then_writes_each_once(
    writer: MinuteWriter, store: FakeStore
) -> None:
    store.down = True
    writer.submit([row(0), row(1)])
    await wait_until_down(writer, store, failures=3)  # retried with backoff
    st = writer.status()
    assert st["state"] == "down"
    assert st["pending_rows"] == 2
    assert "connection refused" in st["last_error"]
    assert st["down_since_ms"] == clock()
    with pytest.raises(StoreUnavailable):
        await writer.flush()
    store.down = False
    await writer.flush()
    assert store.rows == {row(0).key: row(0), row(1).key: row(1)}
    assert [len(b) for b in store.batches] == [2]
    assert writer.status()["state"] == "up"
    assert writer.status()["written_rows"] == 2


async def test_rows_submitted_during_an_outage_keep_the_newest_version(
    writer: MinuteWriter, store: FakeStore
) -> None:
    writer.submit([row(0, count=1)])
    await writer.flush()
    store.down = True
    writer.submit([row(0, count=5), row(1)])
    await wait_until_down(writer, store)
    writer.submit([row(0, count=6)])
    store.down = False
    await writer.flush()
    assert store.rows[row(0).key].count == 6
    assert store.rows[row(1).key] == row(1)


async def test_beyond_max_in_memory_rows_spill_to_file_and_are_written_later(
    store: FakeStore, spill: Path
) -> None:
    w = make_writer(store, spill, max_in_memory=2)
    await w.start()
    try:
        store.down = True
        for i in range(5):
            w.submit([row(i)])
        await wait_until_down(w, store, failures=2)
        await eventually(lambda: w.status()["pending_rows"] <= 2)
        st = w.status()
        assert st["spilled_rows"] >= 3
        assert st["spilled_rows"] + st["pending_rows"] == 5
        assert exists(spill)
        store.down = False
        await w.flush()
        assert store.rows == {row(i).key: row(i) for i in range(5)}
        assert not exists(spill)
        assert w.status()["spilled_rows"] == 0
    finally:
        await w.aclose()


async def test_close_while_down_spills_and_a_new_writer_writes_the_file_first(
    store: FakeStore, spill: Path
) -> None:
    w = make_writer(store, spill)
    await w.start()
    store.down = True
    w.submit([row(0), row(1, count=1)])
    await w.aclose()
    assert w.status()["spilled_rows"] == 2
    assert len(read_lines(spill)) == 2
    assert store.rows == {}

    store.down = False
    restarted = make_writer(store, spill)
    await restarted.start()  # writes the spill before returning, when it can
    try:
        assert store.rows == {row(0).key: row(0), row(1).key: row(1, count=1)}
        assert not exists(spill)
        assert restarted.status()["written_rows"] == 2
    finally:
        await restarted.aclose()


async def test_spill_file_is_kept_while_store_stays_down_after_restart(
    store: FakeStore, spill: Path
) -> None:
    w = make_writer(store, spill)
    await w.start()
    store.down = True
    w.submit([row(0)])
    await w.aclose()

    restarted = make_writer(store, spill)
    await restarted.start()
    assert restarted.status()["state"] == "down"
    assert restarted.status()["spilled_rows"] == 1
    assert exists(spill)
    restarted.submit([row(0, count=9)])  # newer than the spilled version
    store.down = False
    await restarted.flush()
    await restarted.aclose()
    assert store.rows[row(0).key].count == 9
    assert not exists(spill)


async def test_torn_line_in_spill_file_is_skipped_and_the_rest_written(
    store: FakeStore, spill: Path
) -> None:
    good = orjson.dumps(
        {
            "exchange": "exchange1",
            "symbol": "BTCUSDT",
            "minute_ms": M0,
            "average": 100.0,
            "low": 99.0,
            "high": 101.0,
            "count": 3,
        }
    )
    write(spill, good + b"\n" + good[:20])  # a crash tore the last line
    w = make_writer(store, spill)
    await w.start()
    await w.aclose()
    assert store.rows == {row(0).key: row(0)}
    assert not exists(spill)


async def test_close_writes_pending_rows_and_is_idempotent(store: FakeStore, spill: Path) -> None:
    w = make_writer(store, spill)
    await w.start()
    w.submit([row(0)])
    await w.aclose()
    await w.aclose()
    assert store.rows == {row(0).key: row(0)}
    assert not exists(spill)


async def test_rows_submitted_after_close_go_to_the_spill_file(
    store: FakeStore, spill: Path
) -> None:
    w = make_writer(store, spill)
    await w.start()
    await w.aclose()
    w.submit([row(3)])
    assert w.status()["spilled_rows"] == 1
    assert exists(spill)


async def test_flush_with_nothing_submitted_returns_at_once(writer: MinuteWriter) -> None:
    async with asyncio.timeout(1):
        await writer.flush()


async def test_cancelled_run_keeps_rows_for_close_to_spill(store: FakeStore, spill: Path) -> None:
    w = make_writer(store, spill)
    store.down = True
    await w.start()
    task = w._task
    assert task is not None
    w.submit([row(0)])
    await wait_until_down(w, store)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await w.aclose()
    assert exists(spill)
    assert w.status()["spilled_rows"] == 1


async def test_unexpected_store_error_keeps_rows_and_retries(store: FakeStore, spill: Path) -> None:
    calls = 0
    real = store.upsert_minutes

    async def flaky(rows: Sequence[MinuteRow], marks: Mapping[str, Mark] | None = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        await real(rows, marks)

    store.upsert_minutes = flaky  # type: ignore[method-assign]
    w = make_writer(store, spill)
    await w.start()
    try:
        w.submit([row(0)])
        await eventually(lambda: row(0).key in store.rows)
        assert calls == 2
        assert "RuntimeError: bug" in w.status()["last_error"]
    finally:
        await w.aclose()
