"""Prometheus exposition, computed at scrape time from the live status objects.

Nothing is incremented per tick for metrics: counters already kept by the pipeline are read
when Prometheus scrapes, so exporting costs nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from marketflow.app.health import HealthReport

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
        http = doc.get("http")
        if http:
            yield CounterMetricFamily(
                "marketflow_http_unauthorized",
                "Control requests refused for a missing or wrong bearer token",
                value=http.get("control_unauthorized", 0),
            )


def metrics_renderer(report: HealthReport) -> Callable[[], bytes]:
    """The /metrics body, collected from ``report`` at every scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(report))
    return lambda: generate_latest(registry)
