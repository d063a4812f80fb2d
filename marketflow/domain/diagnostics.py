"""Pipeline diagnostics: one row per node and minute of what the pipeline did (issue 14).

A row holds the minute's figures, not running totals: ticks received (``ticks_in``) and folded
into the windows (``ticks_out``), rejects by reason, reconnects, the write latency of the
minute-row batches written in that minute, the queue depths when the row was made and the
consumer lag per Kafka partition (empty in the single-process ``all`` role).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PipelineStatsRow:
    """What node ``node_id`` (role ``role``) did in the minute starting at ``minute_ms``."""

    node_id: str
    role: str
    minute_ms: int  # Unix ms, aligned to the minute
    ticks_in: int
    ticks_out: int
    reconnects: int
    rejects: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    lag_by_partition: Mapping[str, int] = field(default_factory=dict)  # "topic:partition" -> n
    queue_depths: Mapping[str, int] = field(default_factory=dict)  # queue -> items waiting
    write_count: int = 0  # minute-row write batches in the minute
    write_p50_ms: float = 0.0
    write_p99_ms: float = 0.0
    written_ms: int = 0  # when the row was made (wall clock)


class PipelineStatsStore(Protocol):
    """Where the rows are kept (PostgreSQL's ``pipeline_stats`` table)."""

    kind: str

    async def write_stats(self, rows: Sequence[PipelineStatsRow]) -> None:
        """Upsert by (node_id, minute_ms): a retried write rewrites, never doubles.

        Raises StoreUnavailable when the store cannot be reached (the caller keeps the rows).
        """
        ...

    async def read_stats(
        self, node: str | None, since_ms: int | None, limit: int
    ) -> list[PipelineStatsRow]:
        """Rows newest first, of one node or all, from ``since_ms`` on, at most ``limit``."""
        ...
