"""Shared pieces of the MinuteWriter unit tests: rows, a writer on the fakes, waiting, logs."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable

import pytest

from marketflow.app.minute_writer import MinuteWriter
from marketflow.backoff import Backoff
from marketflow.domain.aggregates import MinuteRow
from tests.unit.fakes import FakeSpill, FakeStore, ManualClock

T0 = 1_795_482_600_000  # the writer's clock at the start of every test
M0 = 1_795_482_540_000  # the first minute the rows are for
LOGGER = "marketflow.minute_writer"


def row(i: int, count: int = 3) -> MinuteRow:
    return MinuteRow("exchange1", "BTCUSDT", M0 + i * 60_000, 100.0 + i, 99.0, 101.0 + i, count)


def writer(
    store: FakeStore,
    spill: FakeSpill,
    max_in_memory: int = 1000,
    *,
    clock: ManualClock | None = None,
    retry: Backoff | None = None,
    spill_after_s: float | None = None,
) -> MinuteWriter:
    """A writer retrying fast (10-50 ms) unless told otherwise."""
    make = functools.partial(
        MinuteWriter,
        store,
        spill,
        max_in_memory,
        clock or ManualClock(T0),
        retry=retry or Backoff(0.01, 0.05, random.Random(1)),
    )
    return make() if spill_after_s is None else make(spill_after_s=spill_after_s)


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for a condition the writer's background task brings about."""
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


async def more_failures(store: FakeStore, n: int) -> None:
    """Wait until the background task has retried (and failed) ``n`` more times."""
    target = store.failures + n
    await eventually(lambda: store.failures >= target)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    """The writer's log lines of one event (``minute_store_down``, ...), formatted, in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.getMessage().split(" ", 1)[0] == name
    ]


def all_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(" ", 1)[0] for r in caplog.records if r.name == LOGGER]
