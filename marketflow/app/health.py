"""The daemon's own view of itself: what /health answers and /metrics exports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from marketflow.app.aggregator import Aggregator
from marketflow.app.loop_health import LoopHealth
from marketflow.app.modes import ModeController


class WriterStatus(Protocol):
    def status(self) -> dict[str, Any]: ...


@dataclass
class HealthReport:
    """Builds the /health document from the live components."""

    aggregator: Aggregator
    modes: ModeController
    writer: WriterStatus
    storage_embedded: bool
    cache_embedded: bool
    fanin_depth: Callable[[], int]
    clock: Callable[[], int]
    extra: Callable[[], dict[str, Any]] | None = None
    loop: LoopHealth | None = None  # loop lag and GC pauses (``loop_lag``, ``gc``)

    def _skew_s(self, exchange: str) -> float | None:
        """Receipt time minus the exchange's own timestamp, for its newest tick."""
        newest = max(
            (w for w in self.aggregator.windows.get(exchange, {}).values() if w.latest_ts >= 0),
            key=lambda w: w.latest_ts,
            default=None,
        )
        if newest is None:
            return None
        return (newest.latest_received_ms - newest.latest_ts) / 1000

    def build(self) -> dict[str, Any]:
        now = self.clock()
        exchanges: dict[str, Any] = {}
        queues: dict[str, int] = {"fanin": self.fanin_depth()}
        feeds_ok = True
        for r in self.modes.running():
            st = r.source.status
            exchanges[st.name] = st.snapshot(now, self._skew_s(st.name))
            queues[st.name] = r.queue.qsize()
            feeds_ok = feeds_ok and st.connected and not st.stale
        writer = self.writer.status()
        storage = {
            **writer,
            "state": "embedded"
            if self.storage_embedded and writer["state"] == "up"
            else writer["state"],
        }
        cache = {
            "kind": self.aggregator.cache_kind,
            "state": "down"
            if not self.aggregator.cache_up
            else ("embedded" if self.cache_embedded else "up"),
            "last_error": self.aggregator.cache_error or None,
        }
        ok = feeds_ok and writer["state"] == "up" and self.aggregator.cache_up
        doc: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "mode": self.modes.mode,
            "exchanges": exchanges,
            "postgres": storage,
            "redis": cache,
            "queues": queues,
            "ticks": self.aggregator.ticks_folded,
            "late_ticks": self.aggregator.late_ticks(),
            # D of the README's crash promise: a tick received longer ago than loss_bound_ms
            # is durable (in Redis) now. It grows with the time ticks wait in the queues.
            "pipeline": {
                "queue_delay_ms": self.aggregator.queue_delay_peak_ms,
                "flush_duration_ms": self.aggregator.flush_duration_ms,
                "loss_bound_ms": self.aggregator.loss_bound_ms(),
                # receipt -> cache write, p50/p99 of recent cache writes (pipeline_metrics.py)
                **self.aggregator.metrics.snapshot(),
            },
        }
        if self.loop is not None:
            doc.update(self.loop.snapshot())
        if self.extra is not None:
            doc.update(self.extra())
        return doc
