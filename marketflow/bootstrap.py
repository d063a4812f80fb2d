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
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web

from marketflow.adapters.capture_postgres import PostgresCaptureStore
from marketflow.adapters.capture_sqlite import SqliteCaptureStore
from marketflow.adapters.feeds.fix_feed import build_fix_source
from marketflow.adapters.feeds.generator import build_generator_source
from marketflow.adapters.feeds.replay import build_file_source
from marketflow.adapters.feeds.tcp_json import build_json_source
from marketflow.adapters.fix.capture_decoder import FixCaptureDecoder
from marketflow.adapters.fix.capture_listener import CaptureListener
from marketflow.adapters.memory_cache import MemoryPriceCache
from marketflow.adapters.postgres import open_postgres
from marketflow.adapters.redis_cache import open_redis
from marketflow.adapters.sqlite_store import open_sqlite
from marketflow.app.aggregator import Aggregator
from marketflow.app.capture import CaptureService
from marketflow.app.health import HealthReport
from marketflow.app.ingest import Source
from marketflow.app.minute_writer import MinuteWriter
from marketflow.app.modes import Mode, ModeController
from marketflow.app.queries import PriceQueries
from marketflow.domain.capture import CaptureStore
from marketflow.domain.errors import CacheUnavailable, ConfigError, StoreUnavailable
from marketflow.domain.ports import MinuteStore, PriceCache
from marketflow.domain.ticks import TickBatch
from marketflow.entrypoints.http_api import build_app
from marketflow.entrypoints.http_messages import add_message_routes
from marketflow.entrypoints.metrics import metrics_renderer
from marketflow.settings import ExchangeSettings, Settings

log = logging.getLogger("marketflow")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


T = TypeVar("T")


async def _open_configured(
    name: str,
    url: str,
    policy: Literal["embedded", "wait"],
    opener: Callable[[], Awaitable[T]],
    retry_s: float = 2.0,
) -> T | None:
    """The configured service, or None when it is unreachable and ``policy`` is "embedded";
    with "wait", retry every ``retry_s`` until it answers (a service started before its
    database)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await opener()
        except (StoreUnavailable, CacheUnavailable) as exc:
            if policy == "embedded":
                log.warning("%s_unreachable host=%s error=%s fallback=embedded",
                            name, _host_of(url), exc)  # fmt: skip
                return None
            log.warning("%s_unreachable attempt=%d error=%s retry_in_s=%s",
                        name, attempt, exc, retry_s)  # fmt: skip
            await asyncio.sleep(retry_s)


async def open_storage(settings: Settings) -> tuple[MinuteStore, bool]:
    """PostgreSQL when configured and reachable, else the embedded SQLite file."""
    pg = settings.postgres
    if pg.dsn:
        store = await _open_configured(
            "postgres", pg.dsn, pg.unreachable_at_start, lambda: open_postgres(pg)
        )
        if store is not None:
            return store, False
    path = settings.embedded.data_dir / "marketflow.sqlite3"
    log.warning("storage_embedded kind=sqlite path=%s", path)
    return await open_sqlite(path), True


async def open_cache(settings: Settings) -> tuple[PriceCache, bool]:
    """Redis when configured and reachable, else the in-process cache."""
    rs = settings.redis
    retention = settings.pipeline.window_retention_s
    if rs.url:
        cache = await _open_configured(
            "redis", rs.url, rs.unreachable_at_start, lambda: open_redis(rs, retention)
        )
        if cache is not None:
            return cache, False
    log.warning("cache_embedded kind=memory")
    return MemoryPriceCache(retention), True


def _host_of(url: str) -> str:
    """Host part of a DSN/URL for logs, never the credentials."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("/", 1)[0]


def live_source(ex: ExchangeSettings, settings: Settings) -> Source[Any]:
    if ex.type == "file":
        return build_file_source(ex, settings.pairs, wall_clock_ms)
    if ex.protocol == "fix":
        return build_fix_source(ex, settings.pairs, settings.pipeline, wall_clock_ms)
    return build_json_source(ex, settings.pairs, settings.pipeline, wall_clock_ms)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind the HTTP port now, so 'address in use' is reported before anything else starts."""
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


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
        self._sock: socket.socket | None = None
        self.store: MinuteStore
        self.cache: PriceCache
        self.writer: MinuteWriter
        self.aggregator: Aggregator
        self.modes: ModeController
        self.capture: CaptureService | None = None
        self.capture_listener: CaptureListener | None = None
        self._capture_store: CaptureStore | None = None
        self.died = asyncio.Event()  # set when a core task fails: the daemon must stop

    def _live_sources(self) -> Sequence[Source[Any]]:
        return [live_source(ex, self.settings) for ex in self.settings.exchanges]

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
        self.store, store_embedded = await open_storage(s)
        self.cache, cache_embedded = await open_cache(s)
        spill = s.embedded.data_dir / "spill" / "minutes.jsonl"
        self.writer = MinuteWriter(
            self.store, spill, s.pipeline.spill_max_rows_in_memory, wall_clock_ms
        )
        await self.writer.start()
        self.aggregator = Aggregator(self.fanin, self.cache, self.writer, s.pipeline, wall_clock_ms)
        if self._resume:
            await self.aggregator.resume(self.store)
        self._spawn(self.aggregator.consume(), "aggregator")
        self._spawn(self.aggregator.run_flusher(), "flusher")
        self.modes = ModeController(
            {"live": self._live_sources, "test": self._test_sources},
            {"live": [e.name for e in s.exchanges], "test": list(s.test_source_names())},
            self.fanin,
            s.pipeline.workers_per_source,
            s.pipeline.source_queue_chunks,
        )
        await self.modes.switch(mode or s.mode)
        if self._serve_http:
            if s.capture.enabled:
                await self._start_capture(store_embedded)
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

    async def _start_capture(self, store_embedded: bool) -> None:
        """The FIX audit trail, on the same database as the minute rows."""
        s = self.settings
        if store_embedded:
            store: CaptureStore = await SqliteCaptureStore.open(
                s.embedded.data_dir / "capture.sqlite3"
            )
        else:
            store = await PostgresCaptureStore.open(s.postgres)
        self._capture_store = store
        self.capture = CaptureService(store, s.capture, FixCaptureDecoder())
        await self.capture.start()
        self.capture_listener = CaptureListener(self.capture, s.capture)
        try:
            await self.capture_listener.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for FIX capture on {s.capture.host}:{s.capture.port}: "
                f"{exc.strerror or exc}"
            ) from exc

    def _capture_health(self) -> dict[str, Any]:
        if self.capture is None or self.capture_listener is None:
            return {}
        return {
            "capture": {
                **self.capture.stats(),
                "listener": {"port": self.capture_listener.port, **self.capture_listener.stats()},
            }
        }

    async def _start_http(self, store_embedded: bool, cache_embedded: bool) -> None:
        s = self.settings
        report = HealthReport(
            self.aggregator,
            self.modes,
            self.writer,
            store_embedded,
            cache_embedded,
            self.fanin.qsize,
            wall_clock_ms,
            self._capture_health,
        )
        queries = PriceQueries(
            self.aggregator,
            lambda: self.store,
            self.modes.exchanges,
            self.modes.known_exchanges,
            s.pairs,
            wall_clock_ms,
        )
        app = build_app(queries, self.modes, report, metrics_renderer(report))
        if self.capture is not None:
            add_message_routes(app, self.capture)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        assert self._sock is not None
        await web.SockSite(self._runner, self._sock).start()

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

    async def stop(self) -> None:
        """Stop reading, drain, write the partial minute, close everything."""
        log.info("stopping")
        if self._runner is not None:
            await self._runner.cleanup()
        if self.capture_listener is not None:
            await self.capture_listener.aclose()
        if self.capture is not None:
            await self.capture.aclose()
        if self._capture_store is not None:
            await self._capture_store.aclose()
        await self.modes.stop()
        await self.fanin.join()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.aggregator.flush(final=True)
        await self.writer.aclose()
        await self.cache.aclose()
        await self.store.aclose()
        log.info("stopped ticks=%d", self.aggregator.ticks_folded)


async def run_daemon(settings: Settings, stop: asyncio.Event) -> int:
    """Run until ``stop`` is set (signals) or a core task dies; 0 on a clean stop."""
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
    """Replay one capture file through the pipeline into storage, then exit."""
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
