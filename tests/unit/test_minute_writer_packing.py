"""The writer packs a batch's seconds itself, in slices of the loop, before the store sees it
(a backfill's 50,000 rows packed in one go held the loop for hundreds of ms)."""

from __future__ import annotations

import asyncio

import pytest

import marketflow.app.minute_writer as minute_writer
from marketflow.adapters.minute_codec import encode_seconds
from marketflow.app.minute_writer import packed
from marketflow.domain.aggregates import MinuteRow
from marketflow.loop_slices import CHECK_EVERY, Slices

M0 = 1_700_000_040_000


def row(i: int, *, seconds: bool = True, blob: bytes | None = None) -> MinuteRow:
    minute = M0 + 60_000 * i
    states = tuple((minute // 1000 + s, 1.0 + s, 2.0 + s, 3.5 * s, s + 1) for s in range(60))
    return MinuteRow(
        "ex1", "BTCUSDT", minute, 2.0, 1.0, 61.0, 1830, 60_000, states if seconds else None, blob
    )


async def test_rows_get_the_bytes_the_store_would_have_packed() -> None:
    rows = [row(i) for i in range(5)]
    out = await packed(rows)
    assert out == rows  # equality ignores ``packed``
    for before, after in zip(rows, out, strict=True):
        assert before.packed is None
        assert after.packed == encode_seconds(before.minute_ms, before.seconds)


async def test_rows_already_packed_or_without_seconds_are_left_as_they_are() -> None:
    rows = [row(0, blob=b"kept"), row(1, seconds=False)]
    out = await packed(rows)
    assert out is rows
    assert out[0].packed == b"kept"
    assert out[1].packed is None


async def test_a_big_batch_lets_the_loop_run_between_its_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(minute_writer, "Slices", lambda: Slices(0.0))
    rows = [row(i) for i in range(CHECK_EVERY * 4)]
    turns = 0
    finished = False

    async def other() -> None:
        nonlocal turns
        while not finished:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    out = await packed(rows)
    finished = True
    await task
    assert turns >= 4  # served at each slice, not only once the batch was done
    assert all(r.packed is not None for r in out)
