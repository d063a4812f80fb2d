"""Sliced work: yields once a slice is spent, counts only its own time, and (when asked)
finishes instead of stopping half way when cancelled at a pause."""

from __future__ import annotations

import asyncio
import time

import pytest

from marketflow.loop_slices import Slices


def test_a_slice_is_spent_only_once_its_time_has_run() -> None:
    assert not Slices(60.0).spent()
    slices = Slices(0.001)
    time.sleep(0.002)
    assert slices.spent()


async def test_a_pause_lets_other_tasks_run_and_is_not_counted_as_busy() -> None:
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")
        time.sleep(0.05)  # noqa: ASYNC251 - holds the loop while the sliced step is paused

    slices = Slices(0.0)
    task = asyncio.create_task(other())
    await slices.pause()
    await task
    assert ran == ["other"]
    assert slices.yields == 1
    assert slices.done() < 0.04  # the 50 ms the other task took are not the step's


async def test_a_cancel_at_a_pause_propagates_by_default() -> None:
    async def step() -> None:
        slices = Slices(0.0)
        while True:
            await slices.pause()

    task = asyncio.create_task(step())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_step_that_finishes_on_cancel_runs_to_its_end_without_pausing() -> None:
    done: list[int] = []

    async def step() -> Slices:
        slices = Slices(0.0, finish_on_cancel=True)
        for i in range(100):
            if slices.spent():
                await slices.pause()
            done.append(i)
        return slices

    task = asyncio.create_task(step())
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    slices = await task
    assert done == list(range(100))
    assert slices.cancelled
    assert not slices.spent()  # no more pauses once cancelled
    assert 1 <= slices.yields < 100
