"""The ingest role: read the feeds this node owns, publish their ticks to Kafka.

The feeds are read exactly as in the single process (a source per exchange, its worker pool,
the fan-in queue: app/ingest.py); instead of the aggregator a sink takes the batches from the
fan-in queue and publishes them (one record per symbol, records.encode_batch) through the
hold-back publisher (adapters/kafka/publisher.py). Which feeds this node reads is the feeds
group's decision (adapters/kafka/feed_group.py). No PostgreSQL or Redis: an ingest node keeps
nothing but its spill file and, for FIX, its sequence-number files. Test-mode (synthetic)
sources are not run by this role: their ticks are the single process's demo, and naming them
in the feeds topic would assign fake venues like real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from marketflow.adapters.fix.seq_store import SequenceStore
from marketflow.adapters.kafka.feed_group import FeedGroup, ResumePoint, mark_value, scan_marks
from marketflow.adapters.kafka.producer import (
    KafkaSender,
    build_producer,
    partitions_of,
    wait_for_topics,
)
from marketflow.adapters.kafka.producer import connection_options as kafka_options
from marketflow.adapters.kafka.publisher import Ack, HoldBackPublisher, OutRecord, RecordSpillFile
from marketflow.adapters.kafka.records import encode_batch
from marketflow.app.ingest import ParseGate, RunningSource
from marketflow.domain.feeds import Source
from marketflow.domain.ticks import TickBatch
from marketflow.entrypoints.http_common import JsonErrorsRunner
from marketflow.entrypoints.http_ingest import build_ingest_app
from marketflow.lifecycle import CoreTasks
from marketflow.settings import ExchangeSettings, Settings

log = logging.getLogger("marketflow.ingest_role")

MAX_BATCHES_PER_SEND = 1024  # fan-in batches published with one wait for acknowledgements


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def feed_state(source: Source[Any]) -> str:
    st = source.status
    if not st.connected:
        return "disconnected"
    return "stale" if st.stale else "connected"


def _status_sent(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("feed_status_unsent error=%r", future.exception())


class IngestNode:
    """An ingest node: ``start()`` then ``aclose()``; ``died`` is set when a core task fails."""

    def __init__(
        self,
        settings: Settings,
        fanin: asyncio.Queue[TickBatch],
        sock: socket.socket | None,
        died: asyncio.Event,
        build_source: Any,
    ) -> None:
        self.settings = settings
        self.k = settings.kafka
        self.node = settings.node.id or socket.gethostname()
        self.fanin = fanin
        self._parse_gate = ParseGate(settings.pipeline.parse_pass_budget_ms / 1000)
        self._sock = sock
        self.died = died
        self._build_source = build_source  # (ExchangeSettings, resume_mark) -> Source
        self._exchanges = {ex.name: ex for ex in settings.exchanges}
        self._index = {ex.name: i for i, ex in enumerate(settings.exchanges)}
        self.running: dict[str, RunningSource] = {}
        self._ends: dict[int, int] = {}  # ticks topic: acknowledged end offset per partition
        # Below these offsets lies nothing sent since the publisher was last up and idle: where
        # a search for records written despite a failed send starts.
        self._floor: dict[int, int] = {}
        self._rid_prefix = f"{self.node}:{time.time_ns() // 1_000_000}:".encode()
        self._rid_next = 0
        self._acked_mark: dict[str, int] = {}
        self._written_mark: dict[str, int] = {}
        self._status_sent: dict[str, tuple[str, int, int]] = {}  # state, since_ms, sent_ms
        self.published_ticks = 0
        self._exit = contextlib.AsyncExitStack()
        self._core = CoreTasks(died)
        self._feed_lock = asyncio.Lock()
        self.sender: KafkaSender
        self.publisher: HoldBackPublisher
        self.group: FeedGroup

    @property
    def client_id(self) -> str:
        return f"{self.k.client_id}-{self.node}"

    async def start(self) -> None:
        k, s = self.k, self.settings
        await wait_for_topics(
            k,
            self.client_id,
            {k.ticks_topic: k.ticks_partitions, k.status_topic: 1, k.feeds_topic: len(s.exchanges)},
            exact=[k.feeds_topic],
        )
        self._ends = await self._ticks_ends()
        self._floor = dict(self._ends)
        self.sender = KafkaSender(
            lambda: build_producer(k, self.client_id), k.request_timeout_ms / 1000
        )
        await self.sender.start()
        self._exit.push_async_callback(self.sender.aclose)
        spill = RecordSpillFile(s.embedded.data_dir / "spill" / f"kafka-{self.node}.bin")
        self.publisher = HoldBackPublisher(
            self.sender,
            spill,
            max_held=k.hold_back_max_records,
            max_spilled=k.spill_max_records,
            on_acked=self._acked,
            reconcile=self._already_written,
        )
        await self.publisher.recover()
        self._exit.push_async_callback(self.publisher.close, k.request_timeout_ms / 1000)
        self._core.spawn(self.publisher.run(), "kafka-resender")
        self._core.spawn(self._sink(), "kafka-sink")
        self._exit.push_async_callback(self._core.cancel)
        self.group = FeedGroup(k, self.node, list(self._exchanges), self._start_feed, self._stop)
        # Closed in reverse: feeds stopped and published first, then the group is left (so
        # no other node starts them while this one still reads), then the tasks end.
        self._exit.push_async_callback(self.group.aclose)
        self._exit.push_async_callback(self._stop_all)
        await self.group.start()
        self._core.spawn(self._status_loop(), "feed-status")
        self._core.spawn(self._mark_loop(), "feed-marks")
        if self._sock is not None:
            await self._start_http()
        log.info(
            "started role=ingest node=%s feeds=%s kafka=%s",
            self.node, ",".join(self._exchanges), k.bootstrap_servers,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self._exit.aclose()

    # -- tasks ------------------------------------------------------------------------------

    # -- the sink: fan-in queue -> records -> publisher -------------------------------------
    async def _sink(self) -> None:
        fanin, topic, node = self.fanin, self.k.ticks_topic, self.node.encode()
        while True:
            batches = [await fanin.get()]
            while len(batches) < MAX_BATCHES_PER_SEND and not fanin.empty():
                batches.append(fanin.get_nowait())
            records: list[OutRecord] = []
            for b in batches:
                encoded = encode_batch(b)
                if not encoded:  # a mark alone: resuming before it re-reads no tick
                    continue
                headers = [("node", node), ("feed", b.exchange.encode())]
                if b.mark is not None:
                    headers.append(("mark", str(b.mark).encode()))
                for i, (key, value) in enumerate(encoded):
                    rid = self._rid_prefix + str(self._rid_next).encode()
                    self._rid_next += 1
                    records.append(
                        OutRecord(
                            topic, key, value, [*headers, ("rid", rid)], b.exchange, b.mark,
                            b.count if i == 0 else 0, rid,
                        )
                    )  # fmt: skip
            if self.publisher.state == "up" and not self.publisher.backlog:
                self._floor = dict(self._ends)
            try:
                await self.publisher.publish(records)
            finally:
                for _ in batches:  # handed over: acknowledged, held back or spilled
                    fanin.task_done()

    def _acked(self, records: Sequence[OutRecord], acks: Sequence[Ack]) -> None:
        ticks_topic, ends, marks = self.k.ticks_topic, self._ends, self._acked_mark
        for r, (partition, offset) in zip(records, acks, strict=True):
            if r.topic != ticks_topic:
                continue
            if offset + 1 > ends.get(partition, 0):
                ends[partition] = offset + 1
            self.published_ticks += r.ticks
            if r.mark is not None and r.mark > marks.get(r.feed, 0):
                marks[r.feed] = r.mark

    async def _already_written(self, records: Sequence[OutRecord]) -> dict[bytes, Ack]:
        """The records among ``records`` the ticks topic holds (a send that failed after the
        broker had written it), by their ``rid`` header, read from the floor offsets on."""
        wanted = {r.rid for r in records if r.rid}
        found: dict[bytes, Ack] = {}
        reader = AIOKafkaConsumer(
            **kafka_options(self.k, f"{self.client_id}-reconcile"), enable_auto_commit=False
        )
        await reader.start()
        try:
            tps = await partitions_of(reader, self.k.ticks_topic)
            reader.assign(tps)
            ends = await reader.end_offsets(tps)
            todo = {}
            for tp in tps:
                start = self._floor.get(tp.partition, 0)
                if start < ends[tp]:
                    reader.seek(tp, start)
                    todo[tp] = ends[tp]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.k.request_timeout_ms / 1000 * 4
            while todo:
                if loop.time() > deadline:  # the resender asks again in a second
                    raise TimeoutError(f"reconcile: partitions {sorted(todo)} not read")
                got = await reader.getmany(*todo, timeout_ms=1_000, max_records=10_000)
                for tp, recs in got.items():
                    for rec in recs:
                        rid = dict(rec.headers).get("rid")
                        if rid in wanted:
                            found[rid] = (tp.partition, rec.offset)
                    if await reader.position(tp) >= todo[tp]:
                        del todo[tp]
        finally:
            await reader.stop()
        return found

    async def _ticks_ends(self) -> dict[int, int]:
        reader = AIOKafkaConsumer(**kafka_options(self.k, f"{self.client_id}-ends"))
        await reader.start()
        try:
            tps = await partitions_of(reader, self.k.ticks_topic)
            if not tps:
                return {}
            return {tp.partition: o for tp, o in (await reader.end_offsets(tps)).items()}
        finally:
            await reader.stop()

    # -- feeds: started and stopped by the group --------------------------------------------
    async def _start_feed(self, name: str, point: ResumePoint) -> None:
        async with self._feed_lock:
            if name in self.running:
                return
            ex = self._exchanges[name]
            mark: int | None = None
            if ex.protocol == "fix" and ex.type == "tcp":
                mark = await self._fix_resume(ex, point)
                self._acked_mark[name] = mark or 0
                # A mark record at once: whatever this owner publishes is after its offsets.
                await self._write_mark(name, force=True)
            resume = mark
            source = self._build_source(ex, lambda: resume)
            self.running[name] = RunningSource(
                source,
                self.fanin,
                self.settings.pipeline.workers_per_source,
                self.settings.pipeline.source_queue_chunks,
                self._parse_gate,
                slot_bytes=self.settings.pipeline.read_chunk_bytes,
            )
            log.info("feed_started node=%s feed=%s resume_mark=%s", self.node, name, mark)

    async def _fix_resume(self, ex: ExchangeSettings, point: ResumePoint) -> int | None:
        """The next MsgSeqNum to ask for: the last mark record's, or a newer one from the
        ticks a previous owner published after writing it. Our own outbound numbers skip
        ahead of the previous owner's (a venue refuses a number it has seen)."""
        mark = point.mark if point.mark else None
        if point.offsets:
            scanned = await scan_marks(self.k, f"{self.client_id}-scan", ex.name, point.offsets)
            if scanned is not None and scanned > (mark or 0):
                mark = scanned
        if point.next_out is not None and point.node != self.node:
            target = ex.target_comp_id or ex.name.upper()
            store = SequenceStore.for_venue(
                self.settings.embedded.data_dir, ex.name, ex.sender_comp_id, target
            )
            saved = await asyncio.to_thread(store.load)
            next_out = max(
                saved.next_out if saved else 1, point.next_out + self.k.fix_out_seq_margin
            )
            next_in = mark or (saved.next_in if saved else 1)
            await asyncio.to_thread(store.save, next_out, next_in)
        log.info(
            "fix_resume_point feed=%s mark=%s from_node=%s next_out=%s",
            ex.name, mark, point.node or None, point.next_out,
        )  # fmt: skip
        return mark

    async def _stop(self, names: Sequence[str]) -> None:
        """Stop reading ``names``, publish what was read, write their marks: then another node
        may start them (the group waits for this)."""
        async with self._feed_lock:
            stopping = [self.running.pop(n) for n in names if n in self.running]
            await asyncio.gather(*(r.stop() for r in stopping))
            await self.fanin.join()
            try:
                async with asyncio.timeout(self.k.request_timeout_ms / 1000 * 2):
                    await self.publisher.drained()
            except TimeoutError:
                log.error(  # noqa: TRY400 - a state, not an error's traceback
                    "feeds_stopped_unpublished feeds=%s backlog=%d",
                    ",".join(names), self.publisher.backlog,
                )  # fmt: skip
            for r in stopping:
                with contextlib.suppress(Exception):
                    await self._write_mark(r.name, force=True, running=r)
                await self._send_status(r.name, "disconnected")
            for r in stopping:
                log.info("feed_stopped node=%s feed=%s", self.node, r.name)

    async def _stop_all(self) -> None:
        await self._stop(list(self.running))

    # -- marks and status -------------------------------------------------------------------
    async def _write_mark(
        self, name: str, *, force: bool = False, running: RunningSource | None = None
    ) -> None:
        mark = self._acked_mark.get(name)
        if mark is None or (not force and self._written_mark.get(name) == mark):
            return
        r = running or self.running.get(name)
        session = getattr(r.source.producer, "session", None) if r is not None else None
        next_out = session.next_out_seq if session is not None else None
        value = mark_value(name, mark, next_out, self.node, dict(self._ends))
        await self.sender.producer.send_and_wait(
            self.k.feeds_topic, value, key=name.encode(), partition=self._index[name]
        )
        self._written_mark[name] = mark

    async def _mark_loop(self) -> None:
        while True:
            await asyncio.sleep(self.k.mark_interval_ms / 1000)
            if self.publisher.state != "up":
                continue
            for name in list(self.running):
                try:
                    await self._write_mark(name)
                except Exception as exc:  # noqa: BLE001 - a hint: the next round retries
                    log.warning("feed_mark_failed feed=%s error=%r", name, exc)

    async def _send_status(self, name: str, state: str) -> None:
        now = wall_clock_ms()
        prev = self._status_sent.get(name)
        since = prev[1] if prev is not None and prev[0] == state else now
        self._status_sent[name] = (state, since, now)
        value = orjson.dumps(
            {"v": 1, "exchange": name, "state": state, "node": self.node, "at_ms": now,
             "since_ms": since}
        )  # fmt: skip
        try:
            async with asyncio.timeout(0.5):
                sent = await self.sender.producer.send(
                    self.k.status_topic, value, key=name.encode()
                )
            sent.add_done_callback(_status_sent)
        except Exception as exc:  # noqa: BLE001 - a heartbeat: the next one follows in 1 s
            log.debug("feed_status_unsent feed=%s error=%r", name, exc)

    async def _status_loop(self) -> None:
        interval = self.k.status_interval_ms
        while True:
            await asyncio.sleep(min(0.2, interval / 1000))
            now = wall_clock_ms()
            for name, r in list(self.running.items()):
                state = feed_state(r.source)
                prev = self._status_sent.get(name)
                if prev is None or prev[0] != state or now - prev[2] >= interval:
                    await self._send_status(name, state)

    # -- HTTP: /health and /metrics ---------------------------------------------------------
    def health(self) -> dict[str, Any]:
        now = wall_clock_ms()
        exchanges = {n: r.source.status.snapshot(now) for n, r in self.running.items()}
        kafka = {
            **self.publisher.stats(),
            "published_ticks": self.published_ticks,
            "producer_replaced": self.sender.replaced,
        }
        ok = kafka["state"] == "up" and all(
            e["connected"] and not e["stale"] for e in exchanges.values()
        )
        queues = {
            "fanin": self.fanin.qsize(),
            **{n: r.queue.qsize() for n, r in self.running.items()},
        }
        return {
            "status": "ok" if ok else "degraded",
            "role": "ingest",
            "node": self.node,
            "exchanges": exchanges,
            "feeds": self.group.stats(),
            "kafka": kafka,
            "queues": queues,
        }

    def metrics_text(self) -> str:
        h = self.health()
        k = h["kafka"]
        lines = [
            "# TYPE marketflow_ingest_feeds_owned gauge",
            f"marketflow_ingest_feeds_owned {len(h['feeds']['owned'])}",
            "# TYPE marketflow_kafka_up gauge",
            f"marketflow_kafka_up {1 if k['state'] == 'up' else 0}",
            "# TYPE marketflow_kafka_held_back_records gauge",
            f"marketflow_kafka_held_back_records {k['held_back']}",
            "# TYPE marketflow_kafka_spilled_records gauge",
            f"marketflow_kafka_spilled_records {k['spilled']}",
            "# TYPE marketflow_kafka_published_records_total counter",
            f"marketflow_kafka_published_records_total {k['published_records']}",
            "# TYPE marketflow_kafka_published_ticks_total counter",
            f"marketflow_kafka_published_ticks_total {k['published_ticks']}",
            "# TYPE marketflow_ingest_ticks_total counter",
        ]
        for name, e in h["exchanges"].items():
            lines.append(f'marketflow_ingest_ticks_total{{exchange="{name}"}} {e["ticks"]}')
        return "\n".join(lines) + "\n"

    async def _start_http(self) -> None:
        app = build_ingest_app(self.health, self.metrics_text)
        runner = JsonErrorsRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._exit.push_async_callback(runner.cleanup)
        assert self._sock is not None
        await web.SockSite(runner, self._sock).start()
