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

from marketflow.adapters.capture.decoder import FixCaptureDecoder
from marketflow.adapters.capture.listener import CaptureListener
from marketflow.adapters.capture.postgres_store import PostgresCaptureStore
from marketflow.adapters.capture.sqlite_store import SqliteCaptureStore
from marketflow.adapters.feeds.fix_feed import build_fix_source
from marketflow.adapters.feeds.generator import build_generator_source
from marketflow.adapters.feeds.replay import build_file_source
from marketflow.adapters.feeds.tcp_json import build_json_source
from marketflow.adapters.feeds.websocket import build_websocket_source
from marketflow.adapters.fix.dictionary import FixDictionary
from marketflow.adapters.kafka.capture import KafkaCaptureSource, KafkaCaptureTee
from marketflow.adapters.postgres.database import Database
from marketflow.adapters.postgres.minute_store import PostgresMinuteStore
from marketflow.adapters.spill_file import JsonlSpillFile
from marketflow.adapters.sqlite.minute_store import open_sqlite
from marketflow.app.aggregator import Aggregator
from marketflow.app.capture import CaptureService
from marketflow.app.health import HealthReport
from marketflow.app.ingest import RunningSource
from marketflow.app.loop_health import LoopHealth
from marketflow.app.minute_writer import MinuteWriter
from marketflow.app.modes import Mode, ModeController
from marketflow.app.pipeline_metrics import PipelineMetrics
from marketflow.app.queries import PriceQueries
from marketflow.app.stream_hub import StreamHub
from marketflow.app.world_view import WorldView
from marketflow.domain.capture import CaptureStore
from marketflow.domain.errors import ConfigError
from marketflow.domain.feeds import Source
from marketflow.domain.ports import MinuteStore, PriceCache
from marketflow.domain.ticks import TickBatch
from marketflow.entrypoints.http_api import build_app
from marketflow.entrypoints.http_common import ControlGuard, JsonErrorsRunner, rfc3339
from marketflow.entrypoints.http_messages import add_message_routes
from marketflow.entrypoints.http_metrics import HttpMetrics
from marketflow.entrypoints.metrics import metrics_renderer
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
        self.fanin: asyncio.Queue[TickBatch] = asyncio.Queue(p.fanin_queue_batches)
        self._tasks: list[asyncio.Task[None]] = []
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
        self.died = asyncio.Event()  # set when a core task fails: the daemon must stop
        # Latency histograms shared by the writer and the aggregator (/metrics, /health).
        self.metrics = PipelineMetrics()
        # -- streaming (issue 13): bbo/book channels and venue status from the world view
        self.stream: StreamHub | None = None  # with HTTP only: /stream and /stream/sse
        self.ingest_node: IngestNode | None = None  # role ingest (issue 14)
        self.capture_kafka: list[KafkaCaptureTee | KafkaCaptureSource] = []  # issue 14

    def _live_sources(self) -> Sequence[Source[Any]]:
        agg = self.aggregator
        return [
            live_source(ex, self.settings, functools.partial(agg.position, ex.name))
            for ex in self.settings.exchanges
        ]

    def _test_sources(self) -> Sequence[Source[Any]]:
        s = self.settings
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
        # One database for every store: the minute rows and the audit trail fall back together.
        self._db = await open_storage(s)
        store_embedded = self._db is None
        if self._db is not None:
            self._exit.push_async_callback(self._db.aclose)
            self.store = PostgresMinuteStore(self._db)
        else:
            path = s.embedded.data_dir / "marketflow.sqlite3"
            log.warning("storage_embedded kind=sqlite path=%s", path)
            self.store = await open_sqlite(path)
        self._exit.push_async_callback(self.store.aclose)
        self.cache, cache_embedded = await open_cache(s)
        self._exit.push_async_callback(self.cache.aclose)
        spill_dir = s.embedded.data_dir / "spill"
        # -- world view: books of each folded batch, feed link states read at each flush
        self.world_view = WorldView(
            s.world_view,
            wall_clock_ms,
            lambda: [r.source.status for r in self.modes.running()],
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
        self.modes = ModeController(
            {"live": self._live_sources, "test": self._test_sources},
            {"live": [e.name for e in s.exchanges], "test": list(s.test_source_names())},
            functools.partial(
                RunningSource,
                fanin=self.fanin,
                workers=s.pipeline.workers_per_source,
                queue_size=s.pipeline.source_queue_chunks,
            ),
        )
        self.aggregator = Aggregator(
            self.fanin,
            self.cache,
            self.writer,
            s.pipeline,
            wall_clock_ms,
            healthy_sources=self.modes.healthy_sources,
            metrics=self.metrics,
            on_latest=self.stream.publish_latest if self.stream is not None else None,
        )
        self.aggregator.on_books = self.world_view.on_books
        self.aggregator.on_flush = self.world_view.poll
        if self._resume:
            await self.aggregator.resume(self.store)
        if self.stream is not None:  # what the windows hold already is the ticks snapshot
            agg = self.aggregator
            self.stream.publish_latest(lp for w in agg.all_windows() if (lp := w.latest()))
        self._spawn(self.aggregator.consume(), "aggregator")
        self._spawn(self.aggregator.run_flusher(), "flusher")
        self._exit.push_async_callback(self._finish_pipeline)
        self._exit.push_async_callback(self._drain_sources)
        await self.modes.switch(mode or s.mode)
        if self._serve_http:
            if s.capture.enabled:
                await self._start_capture()
            await self._start_http(store_embedded, cache_embedded)
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

    def _stream_health(self) -> dict[str, Any]:
        return {} if self.stream is None else {"stream": self.stream.stats()}

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
        loop = LoopHealth()  # how late the loop runs, and GC pauses: /health, /metrics
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
            lambda: {**self._capture_health(), "http": guard.stats(), **self._stream_health()},
            loop=loop,
        )
        queries = PriceQueries(
            self.aggregator,
            lambda: self.store,
            self.modes.exchanges,
            self.modes.known_exchanges,
            s.pairs,
            wall_clock_ms,
        )
        http_metrics = HttpMetrics()  # request duration per route pattern
        metrics_text = metrics_renderer(report, s.pairs, http_metrics, self._bbo_spread)
        stream = None if self.stream is None else (self.stream, s.stream)
        app = build_app(
            queries, self.modes, report, metrics_text, guard, self.world_view, stream=stream
        )
        http_metrics.install(app)
        if self.capture is not None:
            add_message_routes(app, self.capture)
        self._runner = JsonErrorsRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._exit.push_async_callback(self._runner.cleanup)
        assert self._sock is not None
        await web.SockSite(self._runner, self._sock).start()
        if self.stream is not None:  # closed before the HTTP server stops (LIFO)
            await self.stream.start()
            self._exit.push_async_callback(self.stream.aclose)

    @property
    def http_port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else 0

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.error("task_died task=%s error=%r", task.get_name(), exc, exc_info=exc)
        self.died.set()

    async def _keep_consuming(self) -> None:
        consumer = next(t for t in self._tasks if t.get_name() == "aggregator")
        while True:
            await asyncio.gather(consumer, return_exceptions=True)
            log.error("aggregator_restarted reason=consumer_died action=drain_for_shutdown")
            consumer = asyncio.create_task(self.aggregator.consume(), name="aggregator")
            self._tasks.append(consumer)

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
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
