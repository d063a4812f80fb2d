"""A refill's seconds are captured at once and read later: what it yields is what the windows
held at the capture, whatever they did meanwhile (ticks, packing, unpacking, eviction)."""

from __future__ import annotations

import random

from marketflow.domain.seconds_snapshot import SecondsSnapshot
from marketflow.domain.window import PairWindow

T0 = 1_795_482_600_000  # a minute start


def test_a_snapshot_yields_what_the_windows_held_when_it_was_taken() -> None:
    rng = random.Random(5)
    windows = [PairWindow("ex", f"P{i}") for i in range(4)]
    for w in windows:
        w.add([(rng.uniform(1, 100), T0 + rng.randrange(0, 300_000)) for _ in range(400)], T0)
        w.take_dirty_seconds()
        w.closed_minutes(T0 + 250_000, 2_000)  # the first minutes packed, the rest open
    assert all(w.packed and w.seconds for w in windows)
    held = sorted(b for w in windows for b in w.all_seconds())
    snap = SecondsSnapshot(w.capture() for w in windows)
    for w in windows:  # afterwards: a late tick unpacks a minute, new ones land, eviction
        w.add([(0.5, T0 + 1_000), (150.0, T0 + 299_000), (2.0, T0 + 900_000)], T0)
        w.take_dirty_seconds()
        w.closed_minutes(T0 + 990_000, 2_000)
        w.evict(300)
    assert len(snap) == len(held)
    assert sorted(snap) == held  # and again: it can be read twice
    assert sorted(snap) == held
    assert held[0] in snap
