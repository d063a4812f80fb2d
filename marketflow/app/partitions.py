"""Kafka partitions moving between aggregate nodes: a rebalance is a restart of the
partitions it moves (the exactness of issue 9, per partition).

Taking partitions over restores exactly their symbols' state (cached seconds, latest prices,
stored rows) and their marks, the newest durable one of Redis's and PostgreSQL's
(restore.py); the consumer then seeks each partition to its mark. Handing partitions back
first folds what was fetched, flushes (seconds and marks to Redis in one script, closed
minutes with the marks to PostgreSQL in one transaction), then forgets their windows and
marks, so this node writes nothing of them afterwards; the next owner resumes from what was
flushed. Two nodes writing one minute around a handover is harmless: a stored row never
shrinks, and the later owner's row holds every tick the earlier one had (it restored them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from marketflow.app.aggregator import Aggregator
from marketflow.app.minute_writer import MinuteWriter
from marketflow.domain.errors import StoreUnavailable
from marketflow.domain.ports import MinuteStore
from marketflow.domain.ticks import TickBatch

log = logging.getLogger("marketflow.partitions")


class PartitionOwner:
    """The aggregator's side of the partitions a Kafka consumer is assigned."""

    def __init__(
        self,
        aggregator: Aggregator,
        store: MinuteStore,
        writer: MinuteWriter,
        fanin: asyncio.Queue[TickBatch],
        *,
        store_timeout_s: float = 10.0,
    ) -> None:
        self._agg = aggregator
        self._store = store
        self._writer = writer
        self._fanin = fanin
        self._timeout_s = store_timeout_s
        self.held: set[str] = set()  # mark sources of the partitions held now

    async def take(self, sources: Sequence[str], owns: Callable[[str], bool]) -> None:
        """Restore the state of the symbols ``owns`` accepts and the marks of ``sources``."""
        wanted = frozenset(sources)
        await self._agg.resume(self._store, owns=owns, sources=wanted.__contains__)
        self.held |= wanted
        log.info("partitions_taken sources=%s marks=%s", sorted(wanted),
                 {s: self._agg.position(s) for s in sorted(wanted)})  # fmt: skip

    async def release(self, sources: Sequence[str], owns: Callable[[str], bool]) -> dict[str, int]:
        """Fold, flush and forget the symbols ``owns`` accepts and the marks of ``sources``;
        the positions the flush made durable (to commit to Kafka)."""
        try:
            await self._fanin.join()  # every batch fetched for them is folded
            await self._agg.flush(sweep=True)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._writer.flush()
            except (StoreUnavailable, TimeoutError) as exc:
                # The rows stay with the writer (written later; they never shrink a fuller
                # row); the next owner rebuilds those minutes from Redis's seconds.
                log.warning("partitions_release_rows_pending error=%r", exc)
            positions = {
                s: mark[0] for s in sources if (mark := self._agg.marks.get(s)) is not None
            }
        finally:
            dropped = self._agg.drop(owns, sources)
            self.held -= set(sources)
        log.info("partitions_released sources=%s windows=%d positions=%s",
                 sorted(sources), dropped, positions)  # fmt: skip
        return positions

    def position(self, source: str) -> int | None:
        return self._agg.position(source)
