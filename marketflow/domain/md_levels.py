"""Price levels as a market-data subscriber sees them, and the changes between two views.

The FIX market-data server (adapters/fix/acceptor.py, app/fix_distribution.py) sends a
subscriber a snapshot of each symbol's levels, then only what changed since the last one it
sent. Levels are keyed by position (1 = best): a subscriber applies "position 2 of the bids
is now this" without a price-keyed book of its own, and a merged book whose level 3 moved to
another venue at the same price is still one change, not a delete and a new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BID = 0  # MDEntryType (269) values
OFFER = 1
NEW = 0  # MDUpdateAction (279) values
CHANGE = 1
DELETE = 2


@dataclass(frozen=True, slots=True)
class Level:
    """One price level: price, size (None when the venue sends none) and the venue quoting it."""

    price: float
    size: float | None
    venue: str


@dataclass(frozen=True, slots=True)
class LevelChange:
    """One entry of an incremental: ``action`` NEW / CHANGE / DELETE at ``position`` (1-based)
    of ``side``; for a DELETE, ``level`` is the one removed."""

    action: int
    side: int
    position: int
    level: Level


@dataclass(frozen=True, slots=True)
class MdRequest:
    """A subscriber's request: ``kind`` 0 snapshot, 1 snapshot + updates, 2 unsubscribe;
    ``depth`` levels a side (1: the best bid/offer, 0: the whole book kept); ``sides`` the
    entry types asked for; ``update_type`` MDUpdateType (265), -1 when absent."""

    req_id: str
    kind: int
    depth: int
    sides: frozenset[int]
    symbols: tuple[str, ...]
    update_type: int = -1


def diff_levels(side: int, old: Sequence[Level], new: Sequence[Level]) -> list[LevelChange]:
    """What turns ``old`` into ``new``, position by position: changes, then news, then
    deletes from the deepest (so a subscriber never sees a hole above a level)."""
    out: list[LevelChange] = []
    common = min(len(old), len(new))
    for i in range(common):
        if old[i] != new[i]:
            out.append(LevelChange(CHANGE, side, i + 1, new[i]))
    for i in range(common, len(new)):
        out.append(LevelChange(NEW, side, i + 1, new[i]))
    for i in range(len(old) - 1, common - 1, -1):
        out.append(LevelChange(DELETE, side, i + 1, old[i]))
    return out
