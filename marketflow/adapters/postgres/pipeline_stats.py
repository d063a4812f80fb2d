"""PostgreSQL ``pipeline_stats``: the once-a-minute diagnostics rows of every node.

Primary key ``(node_id, minute)``; a batch is one ``INSERT ... SELECT FROM unnest(...) ON
CONFLICT DO UPDATE``, so a retried write rewrites a row and never doubles it. The maps
(rejects by reason, lag per partition, queue depths) are ``jsonb``. Shares the daemon's one
``Database`` (pool, error translation, migration 6 makes the table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from marketflow.adapters.postgres.database import DATA_ERRORS, Database, describe
from marketflow.domain.diagnostics import PipelineStatsRow
from marketflow.domain.errors import StoreUnavailable

if TYPE_CHECKING:
    from marketflow.adapters.postgres.database import Conn

_UPSERT = """
INSERT INTO pipeline_stats
    (node_id, minute, role, ticks_in, ticks_out, rejects, reconnects, lag_by_partition,
     queue_depths, write_count, write_p50_ms, write_p99_ms, written_at)
SELECT n, to_timestamp(m / 1000.0), r, ti, tout, rej::jsonb, rc, lag::jsonb, q::jsonb, wc,
       p50, p99, to_timestamp(w / 1000.0)
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],
            $7::bigint[], $8::text[], $9::text[], $10::integer[], $11::float8[],
            $12::float8[], $13::bigint[])
     AS t(n, m, r, ti, tout, rej, rc, lag, q, wc, p50, p99, w)
ON CONFLICT (node_id, minute) DO UPDATE SET
    role = EXCLUDED.role, ticks_in = EXCLUDED.ticks_in, ticks_out = EXCLUDED.ticks_out,
    rejects = EXCLUDED.rejects, reconnects = EXCLUDED.reconnects,
    lag_by_partition = EXCLUDED.lag_by_partition, queue_depths = EXCLUDED.queue_depths,
    write_count = EXCLUDED.write_count, write_p50_ms = EXCLUDED.write_p50_ms,
    write_p99_ms = EXCLUDED.write_p99_ms, written_at = EXCLUDED.written_at
"""

_SELECT = """
SELECT node_id, role, (extract(epoch FROM minute) * 1000)::bigint, ticks_in, ticks_out,
       reconnects, rejects::text, lag_by_partition::text, queue_depths::text, write_count,
       write_p50_ms, write_p99_ms, (extract(epoch FROM written_at) * 1000)::bigint
FROM pipeline_stats
WHERE ($1::text IS NULL OR node_id = $1)
  AND ($2::bigint IS NULL OR minute >= to_timestamp($2::bigint / 1000.0))
ORDER BY minute DESC, node_id
LIMIT $3
"""


def _json(doc: Mapping[str, int]) -> str:
    return orjson.dumps(dict(doc)).decode()


def _map(text: str) -> dict[str, int]:
    doc = orjson.loads(text)
    return {str(k): int(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


class PostgresPipelineStats:
    """``PipelineStatsStore`` on PostgreSQL."""

    kind = "postgres"

    def __init__(self, db: Database) -> None:
        self._db = db

    async def write_stats(self, rows: Sequence[PipelineStatsRow]) -> None:
        if not rows:
            return
        cols: list[list[Any]] = [[] for _ in range(13)]
        for r in rows:
            values = (r.node_id, r.minute_ms, r.role, r.ticks_in, r.ticks_out, _json(r.rejects),
                      r.reconnects, _json(r.lag_by_partition), _json(r.queue_depths),
                      r.write_count, r.write_p50_ms, r.write_p99_ms, r.written_ms)  # fmt: skip
            for col, v in zip(cols, values, strict=True):
                col.append(v)

        async def op(conn: Conn) -> None:
            await conn.execute(_UPSERT, *cols)

        try:
            await self._db.run(op)
        except DATA_ERRORS as exc:  # our own figures: a bug, but never a lost daemon
            raise StoreUnavailable(f"postgres: pipeline_stats refused: {describe(exc)}") from exc

    async def read_stats(
        self, node: str | None, since_ms: int | None, limit: int
    ) -> list[PipelineStatsRow]:
        records = await self._db.run(lambda conn: conn.fetch(_SELECT, node, since_ms, limit))
        return [_row(rec) for rec in records]


def _row(rec: Any) -> PipelineStatsRow:
    return PipelineStatsRow(
        node_id=rec[0], role=rec[1], minute_ms=rec[2], ticks_in=rec[3], ticks_out=rec[4],
        reconnects=rec[5], rejects=_map(rec[6]), lag_by_partition=_map(rec[7]),
        queue_depths=_map(rec[8]), write_count=rec[9], write_p50_ms=rec[10],
        write_p99_ms=rec[11], written_ms=rec[12],
    )  # fmt: skip
