"""Composition root: builds the daemon from one Settings object, runs it, stops it in order.

Start: HTTP port reserved first (a port in use fails fast), storage and cache (embedded
fallbacks when not configured or unreachable), the minute writer (replaying any spill file),
the window resumed from cache and store, the aggregator tasks, the sources of the configured
mode, the capture listener, then HTTP. Stop (SIGINT/SIGTERM): HTTP and capture close, sources
stop reading, queues drain into the aggregator, the partial minute is written, connections
close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from marketflow.adapters.archive.history import ArchivedMinuteStore, ArchiveReader
from marketflow.adapters.archive.parquet import ParquetArchive
from marketflow.adapters.capture.decoder import FixCaptureDecoder
from marketflow.adapters.capture.listener import CaptureListener
from marketflow.adapters.capture.postgres_store import PostgresCaptureStore
from marketflow.adapters.capture.sqlite_store import SqliteCaptureStore
from marketflow.adapters.feeds.fix_feed import build_fix_source
from marketflow.adapters.feeds.generator import build_generator_source
from marketflow.adapters.feeds.replay import build_file_source
from marketflow.adapters.feeds.tcp_json import build_json_source
from marketflow.adapters.feeds.websocket import build_websocket_source
from marketflow.adapters.fix.acceptor import AcceptorPolicy, AcceptorSession, Refusal
from marketflow.adapters.fix.dictionary import FixDictionary
from marketflow.adapters.fix.seq_store import SequenceStore
from marketflow.adapters.kafka.capture import KafkaCaptureSource, KafkaCaptureTee
from marketflow.adapters.kafka.dead_letters import replay_dead_letters
from marketflow.adapters.kafka.feed_status import FeedStatusReader
from marketflow.adapters.kafka.tick_consumer import KafkaTickConsumer
from marketflow.adapters.postgres.archive_source import ArchiveSource
from marketflow.adapters.postgres.database import Database, open_database
from marketflow.adapters.postgres.minute_store import PostgresMinuteStore
from marketflow.adapters.postgres.pipeline_stats import PostgresPipelineStats
from marketflow.adapters.spill_file import JsonlSpillFile
from marketflow.adapters.sqlite.minute_store import open_sqlite
from marketflow.app.aggregator import Aggregator
from marketflow.app.archive import Archiver, DayResult, exit_code
from marketflow.app.capture import CaptureService
from marketflow.app.diagnostics import DiagnosticsWriter, node_name, read_totals
from marketflow.app.fix_distribution import Distribution
from marketflow.app.health import HealthReport
from marketflow.app.ingest import FaninQueue, ParseGate, RunningSource
from marketflow.app.loop_health import LoopHealth
from marketflow.app.minute_writer import MinuteWriter
from marketflow.app.modes import Mode, ModeController
from marketflow.app.partitions import PartitionOwner
from marketflow.app.peer_windows import PeerWindows
from marketflow.app.pipeline_metrics import PipelineMetrics
from marketflow.app.queries import PriceQueries
from marketflow.app.stream_hub import StreamHub
from marketflow.app.world_view import WorldView
from marketflow.domain.archive import TABLES as ARCHIVE_TABLES
from marketflow.domain.archive import ArchiveFileError, parse_duration
from marketflow.domain.capture import CaptureStore
from marketflow.domain.errors import ConfigError, StoreUnavailable
from marketflow.domain.feeds import FeedStatus, Source
from marketflow.domain.ports import MinuteStore, PriceCache
from marketflow.domain.ticks import TickBatch
from marketflow.entrypoints.fix_server import FixServer
from marketflow.entrypoints.http_api import build_app
from marketflow.entrypoints.http_common import ControlGuard, JsonErrorsRunner, rfc3339
from marketflow.entrypoints.http_diagnostics import add_diagnostics_routes
from marketflow.entrypoints.http_messages import add_message_routes
from marketflow.entrypoints.http_metrics import HttpMetrics
from marketflow.entrypoints.metrics import metrics_renderer
from marketflow.lifecycle import CoreTasks
from marketflow.roles.ingest import IngestNode
from marketflow.settings import ExchangeSettings, Settings
from marketflow.startup import adopt_spill, open_cache, open_storage, reserve_port, tune_gc

log = logging.getLogger("marketflow")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def live_source(
    ex: ExchangeSettings, settings: Settings, resume_mark: Callable[[], int | None]
) -> Source[Any]:
    """The source of one configured exchange; ``resume_mark`` tells a FIX session where the
    durable state ends (the newest folded mark, restored from Redis/PostgreSQL at start)."""
    if ex.type == "file":
        return build_file_source(ex, settings.pairs, wall_clock_ms, settings.pipeline.max_price)
    if ex.protocol == "fix":
        return build_fix_source(
            ex,
            settings.pairs,
            settings.pipeline,
            wall_clock_ms,
            data_dir=settings.embedded.data_dir,
            resume_mark=resume_mark,
        )
    if ex.protocol == "websocket":
        return build_websocket_source(ex, settings.pairs, settings.pipeline, wall_clock_ms)
    return build_json_source(ex, settings.pairs, settings.pipeline, wall_clock_ms)


class Daemon:
    """The running daemon; ``start()`` then ``stop()``, each once."""

    def __init__(self, settings: Settings, *, serve_http: bool = True, resume: bool = True) -> None:
        self.settings = settings
        self._serve_http = serve_http
        self._resume = resume
        p = settings.pipeline
        self.fanin: asyncio.Queue[TickBatch] = FaninQueue(p.fanin_queue_batches)
        self._runner: web.AppRunner | None = None
        self._db: Database | None = None
        # What start() opened, closed in reverse order by stop(); one failing close does
        # not skip the others, and stop() before (or without) start() closes nothing.
        self._exit = contextlib.AsyncExitStack()
        self._sock: socket.socket | None = None
        self.store: MinuteStore
        self.cache: PriceCache
        self.writer: MinuteWriter
        self.aggregator: Aggregator
        self.modes: ModeController
        self.capture: CaptureService | None = None
        self.capture_listener: CaptureListener | None = None
        self.world_view: WorldView
        self._capture_store: CaptureStore | None = None
        self.fix_server: FixServer | None = None
        self.died = asyncio.Event()  # set when a core task fails: the daemon must stop
        self._core = CoreTasks(self.died)
        # Latency histograms shared by the writer and the aggregator (/metrics, /health).
        self.metrics = PipelineMetrics()
        # -- streaming (issue 13): bbo/book channels and venue status from the world view
        self.stream: StreamHub | None = None  # with HTTP only: /stream and /stream/sse
        self._archive_last_run: dict[str, Any] | None = None  # -- archive (issue 14)
        self.diagnostics: DiagnosticsWriter | None = None  # with HTTP and PostgreSQL only
        # -- the aggregate role (issue 14): ticks from Kafka instead of feeds
        self.kafka_ticks: KafkaTickConsumer | None = None
        self.feed_status: FeedStatusReader | None = None  # feeds read by ingest nodes
        self.peers: PeerWindows | None = None  # other aggregate nodes' pairs, from Redis
        self.ingest_node: IngestNode | None = None  # role ingest (issue 14)
        self.capture_kafka: list[KafkaCaptureTee | KafkaCaptureSource] = []  # issue 14

    def _live_sources(self) -> Sequence[Source[Any]]:
        if self.settings.node.role == "aggregate":
            return []  # the ingest nodes read the feeds
        agg = self.aggregator
        return [
            live_source(ex, self.settings, functools.partial(agg.position, ex.name))
            for ex in self.settings.exchanges
        ]

    def _test_sources(self) -> Sequence[Source[Any]]:
        s = self.settings
        if s.node.role == "aggregate":
            return []
        return [
            build_generator_source(name, s.pairs, s.test_mode, i, wall_clock_ms)
            for i, name in enumerate(s.test_source_names())
        ]

    async def start(self, mode: Mode | None = None) -> None:
        s = self.settings
        if self._serve_http:
            self._sock = reserve_port(s.http.host, s.http.port)
        if s.node.role == "ingest":  # -- Kafka ingest role (issue 14): roles/ingest.py
            await self._start_ingest_role()
            return
        store_embedded, cache_embedded = await self._open_stores()
        spill_dir = s.embedded.data_dir / "spill"
        # -- world view: books of each folded batch, feed link states read at each flush
        self.world_view = WorldView(
            s.world_view,
            wall_clock_ms,
            self._feed_statuses,
            stamp=rfc3339,
        )
        if self._serve_http:
            self.stream = self._build_stream()
        self.writer = MinuteWriter(
            self.store,
            JsonlSpillFile(spill_dir / f"minutes-{self.store.identity}.jsonl"),
            s.pipeline.spill_max_rows_in_memory,
            wall_clock_ms,
            metrics=self.metrics,
            on_written=self.stream.publish_rows if self.stream is not None else None,
        )
        if not store_embedded and self.store.kind == "postgres":
            # Spills of versions that did not name their store were meant for PostgreSQL.
            await asyncio.to_thread(
                adopt_spill, spill_dir / "minutes.jsonl", self.writer.spill.path
            )
        await self.writer.start()
        self._exit.push_async_callback(self.writer.aclose)
        parse_gate = ParseGate(s.pipeline.parse_pass_budget_ms / 1000)
        self.modes = ModeController(
            {"live": self._live_sources, "test": self._test_sources},
            {"live": [e.name for e in s.exchanges], "test": list(s.test_source_names())},
            functools.partial(
                RunningSource,
                fanin=self.fanin,
                workers=s.pipeline.workers_per_source,
                queue_size=s.pipeline.source_queue_chunks,
                gate=parse_gate,
            ),
        )
        self.aggregator = Aggregator(
            self.fanin,
            self.cache,
            self.writer,
            s.pipeline,
            wall_clock_ms,
            healthy_sources=self._healthy_sources,
            metrics=self.metrics,
            on_latest=self.stream.publish_latest if self.stream is not None else None,
        )
        self.aggregator.on_books = self.world_view.on_books
        self.aggregator.parse_backlog = parse_gate.backlog
        self.aggregator.on_flush = self.world_view.poll
        if self._resume and s.node.role != "aggregate":  # there: per partition taken over
            await self.aggregator.resume(self.store)
        if self.stream is not None:  # what the windows hold already is the ticks snapshot
            agg = self.aggregator
            self.stream.publish_latest(lp for w in agg.all_windows() if (lp := w.latest()))
        self._core.spawn(self.aggregator.consume(), "aggregator")
        self._core.spawn(self.aggregator.run_flusher(), "flusher")
        if s.archive.enabled and self._db is not None:  # -- archive (issue 14)
            self._core.spawn(self._archive_every(self._db), "archive")
        self._exit.push_async_callback(self._finish_pipeline)
        self._exit.push_async_callback(self._drain_sources)
        if s.node.role == "aggregate":
            await self._start_aggregate_role()
        await self.modes.switch(mode or s.mode)
        if self._serve_http:
            await self._start_served(store_embedded, cache_embedded)
        log.info(
            "started mode=%s storage=%s%s cache=%s%s http=%s:%s",
            self.modes.mode,
            self.store.kind,
            "(embedded)" if store_embedded else "",
            self.cache.kind,
            "(embedded)" if cache_embedded else "",
            s.http.host,
            self.http_port,
        )

    async def _open_stores(self) -> tuple[bool, bool]:
        """The minute store and the price cache; (store embedded, cache embedded).
        One database for every store: the minute rows and the audit trail fall back together."""
        s = self.settings
        self._db = await open_storage(s)
        store_embedded = self._db is None
        if self._db is not None:
            self._exit.push_async_callback(self._db.aclose)
            # -- archive (issue 14): history queries also read the archived days
            self.store = ArchivedMinuteStore(
                PostgresMinuteStore(self._db), ArchiveReader(s.archive.dir)
            )
        else:
            path = s.embedded.data_dir / "marketflow.sqlite3"
            log.warning("storage_embedded kind=sqlite path=%s", path)
            self.store = await open_sqlite(path)
        self._exit.push_async_callback(self.store.aclose)
        self.cache, cache_embedded = await open_cache(s)
        self._exit.push_async_callback(self.cache.aclose)
        if s.node.role == "aggregate" and (store_embedded or cache_embedded):
            raise ConfigError(
                "node.role 'aggregate' refuses the embedded stores: PostgreSQL and Redis must "
                'be reachable (set unreachable_at_start = "wait" to wait for them)'
            )
        return store_embedded, cache_embedded

    async def _start_served(self, store_embedded: bool, cache_embedded: bool) -> None:
        """What a served daemon adds: diagnostics, capture, the HTTP API, the FIX server."""
        s = self.settings
        await self._start_diagnostics()
        if s.capture.enabled:
            await self._start_capture()
        await self._start_http(store_embedded, cache_embedded)
        if s.fix_server.enabled:
            await self._start_fix_server()

    async def _start_ingest_role(self) -> None:
        """Feeds this node owns -> Kafka; no stores, /health and /metrics only."""
        node = IngestNode(
            self.settings,
            self.fanin,
            self._sock,
            self.died,
            lambda ex, mark: live_source(ex, self.settings, mark),
        )
        self.ingest_node = node
        self._exit.push_async_callback(node.aclose)
        await node.start()

    async def _start_capture(self) -> None:
        """The FIX audit trail, on the same database as the minute rows."""
        s = self.settings
        if self._db is None:
            store: CaptureStore = await SqliteCaptureStore.open(
                s.embedded.data_dir / "capture.sqlite3"
            )
        else:
            store = PostgresCaptureStore(self._db)
        self._capture_store = store
        self._exit.push_async_callback(store.aclose)
        self.capture = CaptureService(store, s.capture, FixCaptureDecoder(), FixDictionary())
        await self.capture.start()
        self._exit.push_async_callback(self.capture.aclose)
        sink = await self._capture_kafka(self.capture)  # -- issue 14: capture over Kafka
        self.capture_listener = CaptureListener(sink, s.capture)
        self._exit.push_async_callback(self.capture_listener.aclose)
        try:
            await self.capture_listener.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for FIX capture on {s.capture.host}:{s.capture.port}: "
                f"{exc.strerror or exc}"
            ) from exc

    # -- pipeline diagnostics (issue 14): a pipeline_stats row per minute, GET /diagnostics
    async def _start_diagnostics(self) -> None:
        """On PostgreSQL only: the embedded (SQLite) storage keeps no diagnostics rows."""
        if self._db is None:
            log.info("diagnostics_not_kept reason=embedded_storage")
            return
        s = self.settings
        self.diagnostics = DiagnosticsWriter(
            PostgresPipelineStats(self._db),
            node_name(s.node.id),
            s.node.role,
            lambda: read_totals(self.modes.statuses.values(), self.aggregator.ticks_folded),
            self._queue_depths,
            self.metrics.take_minute_writes,
            wall_clock_ms,
        )
        if self.kafka_ticks is not None:
            self.diagnostics.lag_by_partition = self.kafka_ticks.lag_by_partition
        await self.diagnostics.start()
        self._exit.push_async_callback(self.diagnostics.aclose)

    def _diagnostics_health(self) -> dict[str, Any]:
        return {} if self.diagnostics is None else {"diagnostics": self.diagnostics.status()}

    def _queue_depths(self) -> dict[str, int]:
        return {"fanin": self.fanin.qsize(), **{r.name: r.queue.qsize() for r in
                                                self.modes.running()}}  # fmt: skip

    async def _capture_kafka(self, capture: CaptureService) -> Any:
        """With Kafka configured: the listener's frames also go to kafka.capture_topic, and
        capture.kafka_source_topic (when set) is read into the audit trail."""
        s = self.settings
        if not s.kafka.enabled:
            return capture
        node = s.node.id or socket.gethostname()
        tee = KafkaCaptureTee(capture, s.kafka, node)
        await tee.start()
        self._exit.push_async_callback(tee.aclose)
        self.capture_kafka = [tee]
        if s.capture.kafka_source_topic:
            source = KafkaCaptureSource(capture, s.kafka, s.capture.kafka_source_topic, node)
            await source.start()
            self._exit.push_async_callback(source.aclose)
            self.capture_kafka.append(source)
        return tee

    def _bbo_spread(self, pair: str) -> float | None:
        doc = self.world_view.bbo(pair)
        spread = None if doc is None else doc.get("spread")
        return spread if isinstance(spread, float | int) else None

    def _build_stream(self) -> StreamHub:
        """The stream hub; venue status from the world view when wired, else the feeds."""
        s = self.settings
        return StreamHub(
            s.stream,
            s.pairs,
            wall_clock_ms,
            view=self.world_view,
        )

    async def _start_aggregate_role(self) -> None:
        """Consume the ticks topic in the aggregate group; stopped before the pipeline
        drains, handing every partition back flushed."""
        s = self.settings
        owner = PartitionOwner(self.aggregator, self.store, self.writer, self.fanin)
        consumer = KafkaTickConsumer(
            s.kafka,
            s.node.id or socket.gethostname(),
            self.fanin,
            owner,
            symbols=frozenset(s.pairs),
            max_price=s.pipeline.max_price,
            clock=wall_clock_ms,
        )
        self.aggregator.on_flushed = consumer.flushed
        status = FeedStatusReader(s.kafka, [e.name for e in s.exchanges], wall_clock_ms)
        await status.start()
        self._exit.push_async_callback(status.aclose)
        self.feed_status = status
        agg = self.aggregator
        self.peers = PeerWindows(
            self.cache, lambda ex, sym: agg.window(ex, sym) is not None, wall_clock_ms
        )
        self._core.spawn(self.peers.run(), "peer-windows")
        self.metrics.bad_records = consumer.rejects.counts
        await consumer.start()
        self._exit.push_async_callback(consumer.aclose)
        for task in consumer.tasks:  # a consumer task that dies (a bug) stops the daemon
            self._core.watch(task)
        self.kafka_ticks = consumer

    def _feed_statuses(self) -> list[FeedStatus]:
        """The feeds' link states: this node's own, or in the aggregate role the ingest
        nodes' (the status topic)."""
        if self.feed_status is not None:
            return self.feed_status.statuses()
        return [r.source.status for r in self.modes.running()]

    def _healthy_sources(self) -> list[str]:
        if self.feed_status is not None:
            return self.feed_status.healthy()
        return self.modes.healthy_sources()

    def _kafka_health(self) -> dict[str, Any]:
        if self.kafka_ticks is None:
            return {}
        feeds = {
            st.name: "stale" if st.stale else ("connected" if st.connected else "disconnected")
            for st in self._feed_statuses()
        }
        return {"kafka": {**self.kafka_ticks.status(), "feeds": feeds}}

    def _stream_health(self) -> dict[str, Any]:
        return {} if self.stream is None else {"stream": self.stream.stats()}

    def _fix_server_health(self) -> dict[str, Any]:
        return {} if self.fix_server is None else {"fix_server": self.fix_server.stats()}

    def _capture_health(self) -> dict[str, Any]:
        if self.capture is None or self.capture_listener is None:
            return {}
        kafka: dict[str, int] = {}
        for part in self.capture_kafka:  # -- issue 14: the Kafka copy and source, if any
            kafka.update(part.stats())
        return {
            "capture": {
                **self.capture.stats(),
                "listener": {"port": self.capture_listener.port, **self.capture_listener.stats()},
                **kafka,
            }
        }

    async def _start_http(self, store_embedded: bool, cache_embedded: bool) -> None:
        s = self.settings
        guard = ControlGuard(s.http.control_token)
        # How late the loop runs, and GC pauses: /health, /metrics; what holds it: the log.
        loop = LoopHealth(
            stall_log_s=s.pipeline.loop_stall_log_ms / 1000,
            young_every_s=s.pipeline.gc_young_every_ms / 1000,
        )
        loop.start()
        self._exit.push_async_callback(loop.aclose)
        report = HealthReport(
            self.aggregator,
            self.modes,
            self.writer,
            store_embedded,
            cache_embedded,
            self.fanin.qsize,
            wall_clock_ms,
            lambda: {
                **self._capture_health(),
                "http": guard.stats(),
                **self._stream_health(),
                **self._archive_health(),
                **self._fix_server_health(),
                **self._diagnostics_health(),
                **self._kafka_health(),
            },
            loop=loop,
        )
        queries = PriceQueries(
            self.aggregator,
            lambda: self.store,
            self.modes.exchanges,
            self.modes.known_exchanges,
            s.pairs,
            wall_clock_ms,
            peers=self.peers,
        )
        http_metrics = HttpMetrics()  # request duration per route pattern
        metrics_text = metrics_renderer(
            report, s.pairs, http_metrics, self._bbo_spread, stream=self.stream
        )
        stream = None if self.stream is None else (self.stream, s.stream)
        app = build_app(
            queries, self.modes, report, metrics_text, guard, self.world_view, stream=stream
        )
        http_metrics.install(app)
        if self.capture is not None:
            add_message_routes(app, self.capture)
        add_diagnostics_routes(app, self.diagnostics.store if self.diagnostics else None)
        self._runner = JsonErrorsRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._exit.push_async_callback(self._runner.cleanup)
        assert self._sock is not None
        await web.SockSite(self._runner, self._sock).start()
        if self.stream is not None:  # closed before the HTTP server stops (LIFO)
            await self.stream.start()
            self._exit.push_async_callback(self.stream.aclose)

    # -- archive (issue 14) --------------------------------------------------------------

    def _archive_health(self) -> dict[str, Any]:
        store = self.store
        if not isinstance(store, ArchivedMinuteStore):
            return {}
        try:
            days: int | None = len(store.reader.entries())
        except (OSError, ArchiveFileError):
            days = None  # an unreadable manifest: history answers say "partial"
        return {
            "archive": {
                "dir": str(store.reader.root),
                "scheduled": self.settings.archive.enabled,
                "archived_days": days,
                "refused_archived_rows": store.refused_archived_rows,
                "last_run": self._archive_last_run,
            }
        }

    async def _archive_every(self, db: Database) -> None:
        """The scheduled archive run (``[archive] enabled``); a failed run is logged and the
        next one tries again (the run itself is idempotent)."""
        a = self.settings.archive
        interval_s = parse_duration(a.interval)
        while True:
            await asyncio.sleep(interval_s)
            try:
                results = await archive_once(db, a.dir, parse_duration(a.older_than))
            except (StoreUnavailable, ArchiveFileError, OSError) as exc:
                log.warning("archive_run_failed error=%s", exc)
                self._archive_last_run = {"status": "failed", "error": str(exc)}
                continue
            if results is None:
                self._archive_last_run = {"status": "skipped", "reason": "locked"}
                continue
            self._archive_last_run = {
                "status": "ok" if exit_code(results) == 0 else "failed",
                "days": len(results),
                "at_ms": wall_clock_ms(),
            }

    # -- FIX market-data server (issue 13): the world view to downstream FIX initiators ------
    async def _start_fix_server(self) -> None:
        """Closed first on stop (last pushed): every session gets its Logout while the
        pipeline still runs."""
        s = self.settings
        fs = s.fix_server
        distribution = Distribution(self.world_view, s.pairs, s.world_view.max_depth)
        self.world_view.subscribe(distribution.mark)
        policy = AcceptorPolicy(
            fs.comp_id, fs.allowed_comp_ids, heartbeat_min_s=fs.heartbeat_min_s,
            heartbeat_max_s=fs.heartbeat_max_s, logon_timeout_s=fs.logon_timeout_s,
            logout_timeout_s=fs.logout_timeout_s,
        )  # fmt: skip
        seq_dir = s.embedded.data_dir / "fix_server"

        def store_for(peer: str) -> SequenceStore:
            return SequenceStore(seq_dir / f"{peer}.seq", fs.comp_id, peer)

        def new_session(admit: Callable[[str], Refusal | None]) -> AcceptorSession:
            return AcceptorSession(
                policy, store_for, admit, monotonic=time.monotonic, wall_ms=wall_clock_ms
            )

        self.fix_server = FixServer(fs, distribution, new_session)
        try:
            await self.fix_server.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for FIX on {fs.host}:{fs.port}: {exc.strerror or exc}"
            ) from exc
        self._exit.push_async_callback(self.fix_server.aclose)

    @property
    def http_port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else 0

    async def _keep_consuming(self) -> None:
        consumer = next(t for t in self._core.tasks if t.get_name() == "aggregator")
        while True:
            await asyncio.gather(consumer, return_exceptions=True)
            log.error("aggregator_restarted reason=consumer_died action=drain_for_shutdown")
            consumer = asyncio.create_task(self.aggregator.consume(), name="aggregator")
            self._core.tasks.append(consumer)

    async def _drain_sources(self) -> None:
        """Stop reading and fold everything already read."""
        # A consumer that died (a bug) must not leave the queues full and stop() waiting on
        # them forever: a new one takes over until everything read is folded.
        watchdog = asyncio.create_task(self._keep_consuming(), name="consumer-watchdog")
        try:
            await self.modes.stop()
            await self.fanin.join()
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    async def _finish_pipeline(self) -> None:
        """Stop the aggregator's tasks and hand the partial minutes to the writer."""
        await self._core.cancel()
        await self.aggregator.flush(final=True)
        log.info("stopped ticks=%d", self.aggregator.ticks_folded)

    async def stop(self) -> None:
        """Stop reading, drain, write the partial minute, close everything (in reverse order
        of start; safe before start and safe to call twice)."""
        log.info("stopping")
        await self._exit.aclose()


async def run_daemon(settings: Settings, stop: asyncio.Event) -> int:
    """Run until ``stop`` is set (signals) or a core task dies; 0 on a clean stop."""
    tune_gc(settings.pipeline.gc_gen0_threshold)
    daemon = Daemon(settings)
    await daemon.start()
    died = asyncio.create_task(daemon.died.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([died, stopped], return_when=asyncio.FIRST_COMPLETED)
    for t in (died, stopped):
        t.cancel()
    await daemon.stop()
    return 1 if daemon.died.is_set() else 0


async def run_replay(settings: Settings, path: Path, speed: float) -> int:
    """Replay one capture file through the pipeline into storage, then exit (with the
    daemon's GC settings: the same hot path)."""
    tune_gc(settings.pipeline.gc_gen0_threshold)
    source = ExchangeSettings(name="replay", type="file", path=path, speed=speed)
    replay_settings = settings.model_copy(update={"exchanges": (source,), "mode": "live"})
    # No resume: the file is the whole truth for the minutes it covers. Merging them with
    # rows or cached seconds of an earlier run would count a replayed tick twice.
    daemon = Daemon(replay_settings, serve_http=False, resume=False)
    await daemon.start()
    for running in daemon.modes.running():
        await running.finished()
    await daemon.stop()
    st = daemon.modes.statuses["replay"]
    log.info("replayed path=%s ticks=%d rejected=%d", path, st.ticks, st.rejects.total())
    return 0


# -- archive (issue 14) -----------------------------------------------------------------------


async def archive_once(
    db: Database, out: Path, older_than_s: int, **kwargs: Any
) -> list[DayResult] | None:
    """One archive run into ``out``; None when another run holds the directory's lock."""
    files = ParquetArchive(out)
    with files.exclusive() as mine:
        if not mine:
            log.info("archive_skipped reason=another_run_holds_the_lock dir=%s", out)
            return None
        archiver = Archiver(ArchiveSource(db), files, older_than_s, wall_clock_ms, **kwargs)
        return await archiver.run()


async def run_archive(
    settings: Settings, out: Path, older_than_s: int, emit: Callable[[dict[str, Any]], None]
) -> int:
    """``marketflow archive``: one run; ``emit`` gets one JSON document per table and day,
    then one per table. Exit status: 0 ok, 1 database or directory unusable, 3 conflict
    (rows changed since the export: nothing deleted), 4 a file failed its read-back."""
    if not settings.postgres.dsn:
        raise ConfigError("archive needs PostgreSQL: set postgres.dsn (MARKETFLOW_POSTGRES__DSN)")
    db = await open_database(settings.postgres)
    try:
        results = await archive_once(db, out, older_than_s)
    finally:
        await db.aclose()
    if results is None:
        emit({"status": "skipped", "reason": "another archive run holds the lock", "dir": str(out)})
        return 1
    for r in results:
        emit(r.to_json())
    for table in sorted(ARCHIVE_TABLES):  # a line per table, also when it had nothing old
        mine = [r for r in results if r.table == table]
        emit(
            {
                "table": table,
                "days": len(mine),
                "rows": sum(r.rows for r in mine if r.status == "ok"),
                "status": "ok" if exit_code(mine) == 0 else "failed",
            }
        )
    return exit_code(results)


async def run_dead_letter_replay(
    settings: Settings, from_offset: int, *, dry_run: bool = False
) -> dict[str, object]:
    """Dead letters that decode now back to the ticks topic (adapters/kafka/dead_letters.py)."""
    summary = await replay_dead_letters(settings, from_offset, dry_run=dry_run)
    return summary.as_dict()
