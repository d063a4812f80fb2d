"""Prometheus exposition, computed at scrape time from the live status objects.

Nothing is incremented per tick for metrics: counters already kept by the pipeline are read
when Prometheus scrapes, so exporting costs nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from marketflow.app.health import HealthReport
from marketflow.app.loop_health import Histogram, LoopHealth

# The per-source families: (kind, name, help, value from the source's /health entry or None).
_PER_SOURCE: tuple[
    tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, Callable[[Any], Any]], ...
] = (
    (CounterMetricFamily, "marketflow_ticks", "Valid ticks received per source",
     lambda ex: ex["ticks"]),
    (CounterMetricFamily, "marketflow_reconnects", "Reconnects per source",
     lambda ex: ex["reconnects"]),
    (GaugeMetricFamily, "marketflow_source_connected", "1 when the source is connected and fresh",
     lambda ex: 1.0 if ex["connected"] and not ex["stale"] else 0.0),
    (GaugeMetricFamily, "marketflow_last_tick_age_seconds", "Seconds since the last tick",
     lambda ex: ex["last_tick_age_s"]),
    (GaugeMetricFamily, "marketflow_receipt_lag_seconds",
     "Receipt time minus exchange timestamp of the newest tick (grows under backpressure)",
     lambda ex: ex["clock_skew_s"]),
)  # fmt: skip


class DaemonCollector(Collector):
    """Feeds, queues, cache and storage figures from one HealthReport."""

    def __init__(self, report: HealthReport) -> None:
        self._report = report

    def collect(self) -> Iterator[Metric]:
        doc = self._report.build()
        exchanges = doc["exchanges"]
        families: list[Metric] = []
        for family, name, help_text, value_of in _PER_SOURCE:
            metric = family(name, help_text, labels=["source"])
            for source, ex in exchanges.items():
                value = value_of(ex)
                if value is not None:
                    metric.add_metric([source], value)
            families.append(metric)
        rejected = CounterMetricFamily(
            "marketflow_rejected",
            "Rejected input per source and reason",
            labels=["source", "reason"],
        )
        for source, ex in exchanges.items():
            for reason, n in ex["rejected_by_reason"].items():
                rejected.add_metric([source, reason], n)
        families.insert(1, rejected)
        depth = GaugeMetricFamily(
            "marketflow_queue_depth", "Items waiting per queue", labels=["queue"]
        )
        for q, n in doc["queues"].items():
            depth.add_metric([q], n)
        yield from (*families, depth)
        yield CounterMetricFamily(
            "marketflow_late_ticks", "Ticks older than the window", value=doc["late_ticks"]
        )
        pipe = doc["pipeline"]
        yield GaugeMetricFamily(
            "marketflow_queue_delay_seconds",
            "Highest receipt-to-fold delay over the last flush interval",
            value=pipe["queue_delay_ms"] / 1000,
        )
        yield GaugeMetricFamily(
            "marketflow_loss_bound_seconds",
            "A tick received longer ago than this is durable (queue delay + flush + write)",
            value=pipe["loss_bound_ms"] / 1000,
        )
        pg = doc["postgres"]
        yield GaugeMetricFamily(
            "marketflow_storage_up",
            "1 when minute storage accepts writes",
            value=1.0 if pg["state"] != "down" else 0.0,
        )
        yield GaugeMetricFamily(
            "marketflow_storage_pending_rows",
            "Minute rows not yet written",
            value=pg.get("pending_rows", 0),
        )
        yield GaugeMetricFamily(
            "marketflow_cache_up",
            "1 when the price cache accepts writes",
            value=1.0 if doc["redis"]["state"] != "down" else 0.0,
        )
        cap = doc.get("capture")
        if cap:
            for key in ("accepted", "rejected_total", "filtered", "stored", "bytes"):
                yield CounterMetricFamily(
                    f"marketflow_capture_{key}",
                    f"FIX capture: {key.replace('_', ' ')}",
                    value=cap.get(key, 0),
                )
        if self._report.loop is not None:
            yield from _loop_metrics(self._report.loop)
        http = doc.get("http")
        if http:
            yield CounterMetricFamily(
                "marketflow_http_unauthorized",
                "Control requests refused for a missing or wrong bearer token",
                value=http.get("control_unauthorized", 0),
            )


def _histogram(name: str, help_text: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, help_text, buckets=[(b, float(n)) for b, n in h.cumulative()], sum_value=h.total
    )


def _loop_metrics(loop: LoopHealth) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "marketflow_loop_lag_max_seconds",
        f"Highest event-loop lag over the last {loop.lag.window_s:g}-{2 * loop.lag.window_s:g} s",
        value=loop.lag.snapshot()["max_ms"] / 1000,
    )
    yield _histogram(
        "marketflow_loop_lag_seconds",
        f"How late a {loop.lag.tick_s * 1000:g} ms timer ran (each beat)",
        loop.lag.histogram,
    )
    yield _histogram(
        "marketflow_gc_pause_seconds", "Cyclic garbage collections, by duration", loop.gc.histogram
    )
    gens = CounterMetricFamily(
        "marketflow_gc_collections", "Cyclic garbage collections", labels=["generation"]
    )
    for g, n in enumerate(loop.gc.collections):
        gens.add_metric([str(g)], n)
    yield gens


def metrics_renderer(report: HealthReport) -> Callable[[], bytes]:
    """The /metrics body, collected from ``report`` at every scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(report))
    return lambda: generate_latest(registry)
