"""Prometheus exposition, computed at scrape time from the live status objects.

Nothing is incremented per tick for metrics: counters already kept by the pipeline are read
when Prometheus scrapes, so exporting costs nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
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
from marketflow.app.pipeline_metrics import PipelineMetrics
from marketflow.app.stream_hub import StreamHub
from marketflow.entrypoints.http_metrics import HttpMetrics

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

    def __init__(
        self,
        report: HealthReport,
        pairs: Sequence[str] = (),
        http: HttpMetrics | None = None,
        spread: Callable[[str], float | None] | None = None,
        stream: StreamHub | None = None,
    ) -> None:
        self._report = report
        self._pairs = tuple(pairs)
        self._http = http
        self._spread = spread
        self._stream = stream

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
        yield from self._optional_metrics(doc)

    def _optional_metrics(self, doc: Mapping[str, Any]) -> Iterator[Metric]:
        """The families of parts that may be off: capture, loop, HTTP, FIX server, stream."""
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
        fix_server = doc.get("fix_server")
        if fix_server:
            yield from _fix_server_metrics(fix_server)
        yield from self._pipeline_metrics(doc)
        yield CounterMetricFamily(
            "marketflow_ticks_folded",
            "Ticks folded into the windows (ticks out of ingest: pipeline_stats ticks_out)",
            value=doc["ticks"],
        )
        if self._stream is not None:
            yield from stream_metrics(self._stream)

    # -- latency histograms, book updates, prices (pipeline_metrics.py, http_metrics.py) ----

    def _pipeline_metrics(self, doc: Mapping[str, Any]) -> Iterator[Metric]:
        agg = self._report.aggregator
        pm: PipelineMetrics = agg.metrics
        yield _labelled_histograms(
            "marketflow_tick_to_cache_seconds",
            "Receipt of the oldest tick batch of a cache write to its acknowledgement, per write",
            "source",
            pm.tick_to_cache,
        )
        yield _histogram(
            "marketflow_minute_write_duration_seconds",
            "Duration of one successful minute-row write batch",
            pm.minute_write,
        )
        books = CounterMetricFamily(
            "marketflow_book_updates", "Top-of-book updates folded per venue", labels=["source"]
        )
        for venue, n in pm.book_updates.items():
            books.add_metric([venue], n)
        yield books
        # -- the aggregate role (issue 14): bad tick records, counted by reason only
        if pm.bad_records is not None:
            bad = CounterMetricFamily(
                "marketflow_kafka_bad_records",
                "Tick records that failed to decode or validate (dead-lettered, skipped)",
                labels=["reason"],
            )
            for reason, n in pm.bad_records.items():
                bad.add_metric([reason], n)
            yield bad
        yield CounterMetricFamily("marketflow_flushes", "Aggregator flushes", value=agg.flushes)
        yield CounterMetricFamily(
            "marketflow_minute_rows_written",
            "Minute rows written to the store",
            value=doc["postgres"].get("written_rows", 0),
        )
        yield GaugeMetricFamily(
            "marketflow_storage_embedded",
            "1 when minute storage runs on the embedded fallback (SQLite)",
            value=1.0 if doc["postgres"]["state"] == "embedded" else 0.0,
        )
        yield GaugeMetricFamily(
            "marketflow_cache_embedded",
            "1 when the price cache runs in process (no Redis)",
            value=1.0 if doc["redis"]["state"] == "embedded" else 0.0,
        )
        # Per pair, as the exception to "never per symbol": the configured pairs only, so the
        # series are bounded by configuration (pairs x sources), for the prices panel.
        prices = GaugeMetricFamily(
            "marketflow_latest_price",
            "Newest price per configured pair and source",
            labels=["pair", "source"],
        )
        for source, windows in agg.windows.items():
            for pair in self._pairs:
                w = windows.get(pair)
                if w is not None and w.latest_ts >= 0:
                    prices.add_metric([pair, source], w.latest_price)
        yield prices
        if self._spread is not None:  # the world view's best ask minus best bid, same bound
            spreads = GaugeMetricFamily(
                "marketflow_bbo_spread",
                "Cross-venue best ask minus best bid per configured pair (negative: crossed)",
                labels=["pair"],
            )
            for pair in self._pairs:
                value = self._spread(pair)
                if value is not None:
                    spreads.add_metric([pair], value)
            yield spreads
        if self._http is not None:
            yield _labelled_histograms(
                "marketflow_http_request_duration_seconds",
                "HTTP request duration per route (the route's path pattern)",
                "route",
                self._http.by_route,
            )


def _fix_server_metrics(fs: Mapping[str, Any]) -> Iterator[Metric]:
    """The FIX market-data server (issue 13): sessions, logons refused by reason (a fixed
    set of kinds), what was sent. No label per CompID or symbol."""
    yield GaugeMetricFamily(
        "marketflow_fix_server_sessions", "FIX market-data sessions logged on", value=fs["sessions"]
    )
    yield CounterMetricFamily(
        "marketflow_fix_server_logons", "FIX market-data logons accepted", value=fs["logons"]
    )
    refused = CounterMetricFamily(
        "marketflow_fix_server_refused_logons",
        "FIX market-data connections refused at logon, by reason",
        labels=["reason"],
    )
    for reason, n in fs["refused"].items():
        refused.add_metric([reason], n)
    yield refused
    for key, help_text in (
        ("messages_sent", "FIX messages sent to market-data subscribers"),
        ("snapshots_sent", "35=W snapshots sent"),
        ("incrementals_sent", "35=X incremental refreshes sent"),
        ("request_rejects", "35=Y market-data request rejects sent"),
        ("garbled", "Unreadable frames received from subscribers (ignored or dropped)"),
        ("slow_closed", "Subscribers disconnected for a send buffer past the bound"),
    ):
        yield CounterMetricFamily(f"marketflow_fix_server_{key}", help_text, value=fs[key])


def _histogram(name: str, help_text: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, help_text, buckets=[(b, float(n)) for b, n in h.cumulative()], sum_value=h.total
    )


def _labelled_histograms(
    name: str, help_text: str, label: str, by_label: Mapping[str, Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=[label])
    for value, h in list(by_label.items()):
        family.add_metric([value], [(b, float(n)) for b, n in h.cumulative()], sum_value=h.total)
    return family


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


# -- the stream hub (GET /stream, /stream/sse): labels per channel only, never per client
def stream_metrics(hub: StreamHub) -> Iterator[Metric]:
    """The hub's figures of /health ``stream``, per channel where they have one."""
    stats = hub.stats()
    yield GaugeMetricFamily(
        "marketflow_stream_connections", "Open stream connections (WebSocket and SSE)",
        value=stats["connections"],
    )  # fmt: skip
    subscribers = GaugeMetricFamily(
        "marketflow_stream_subscribers", "Stream clients subscribed per channel",
        labels=["channel"],
    )  # fmt: skip
    for channel, n in stats["subscribers"].items():
        subscribers.add_metric([channel], n)
    yield subscribers
    for name, help_text, by_channel in (
        ("marketflow_stream_frames_sent", "Stream frames sent per channel (control: "
         "subscribed, unsubscribed, error)", hub.frames_by_channel),
        ("marketflow_stream_conflated", "Stream updates a behind client never saw (a newer "
         "one replaced them), per channel", hub.conflated_by_channel),
    ):  # fmt: skip
        family = CounterMetricFamily(name, help_text, labels=["channel"])
        for channel, n in by_channel.items():
            family.add_metric([channel], n)
        yield family
    for key, help_text in (
        ("bytes_sent", "Stream bytes sent (frame bodies)"),
        ("slow_closed", "Stream clients closed with 1008 (too far behind)"),
        ("connections_refused", "Stream connections refused (stream.max_connections, 503)"),
        ("subscriptions_refused", "Stream subscriptions refused (stream.max_subscriptions)"),
    ):
        yield CounterMetricFamily(f"marketflow_stream_{key}", help_text, value=stats[key])


def metrics_renderer(
    report: HealthReport,
    pairs: Sequence[str] = (),
    http: HttpMetrics | None = None,
    spread: Callable[[str], float | None] | None = None,
    stream: StreamHub | None = None,
) -> Callable[[], bytes]:
    """The /metrics body, collected from ``report`` at every scrape; ``pairs`` (the configured
    ones) bound ``marketflow_latest_price`` and ``marketflow_bbo_spread``; ``http`` adds the
    request-duration histogram; ``spread`` (pair -> the world view's spread) the BBO spread;
    ``stream`` the stream hub's families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(report, pairs, http, spread, stream))
    return lambda: generate_latest(registry)
