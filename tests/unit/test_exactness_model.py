"""Model-based test of the exactness promises (issue 9): aggregator + minute writer + cache +
store on fakes, driven by hypothesis through random ticks (late, duplicate, identical
prices), flushes, minute closes, crashes (all memory lost), restarts, a cache lost or partly
lost, the store down and up, and spill drains.

Invariants after every step:
- no stored row ever shrinks;
- nothing is counted twice: a row never holds more ticks than were sent for its minute;
- nothing durable is lost: once everything is up and settled, each minute holds at least
  what was durable (in the cache, the store or the spill file) at the last crash plus every
  tick sent since, and with no crash at all exactly what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from marketflow.adapters.spill_file import JsonlSpillFile
from marketflow.app.aggregator import Aggregator
from marketflow.app.minute_writer import MinuteWriter
from marketflow.backoff import Backoff
from marketflow.domain.errors import StoreUnavailable
from marketflow.domain.ticks import TickBatch
from marketflow.settings import PipelineSettings
from tests.unit.fakes import FakeCache, FakeStore, ManualClock

T0 = 1_795_482_600_000
PIPE = PipelineSettings(minute_grace_ms=2000, window_retention_s=600)
Key = tuple[str, str, int]


class ExactnessMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="mf-model-"))
        self.clock = ManualClock(T0)
        self.cache = FakeCache()
        self.store = FakeStore()
        self.sent: Counter[Key] = Counter()  # every tick sent, per minute
        self.floor: Counter[Key] = Counter()  # durable at the last crash + sent since
        self.crashed = False
        self.seen: dict[Key, int] = {}
        self._start()

    def _run(self, coro: object) -> None:
        self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def _start(self) -> None:
        self.writer = MinuteWriter(
            self.store,
            JsonlSpillFile(self.dir / "spill.jsonl"),
            3,
            self.clock,
            retry=Backoff(0.001, 4.0, random.Random()),
        )
        self.agg = Aggregator(
            asyncio.Queue(), self.cache, self.writer, PIPE, self.clock,
            healthy_sources=lambda: ["ex1"],
        )  # fmt: skip
        self._run(self.writer.start())
        self._run(self.agg.resume(self.store))

    def teardown(self) -> None:
        try:
            self.settle()  # every run ends settled and checked
        finally:
            self._close()

    def _close(self) -> None:
        self._run(self.writer.aclose())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def begin(self) -> None:
        pass

    @rule(
        ticks=st.lists(
            st.tuples(
                st.sampled_from(["BTCUSDT", "ETHUSDT"]),
                st.sampled_from([1.0, 2.0, 2.0, 3.5]),
                st.integers(min_value=-180_000, max_value=0),
            ),
            min_size=1,
            max_size=12,
        )
    )
    def send(self, ticks: list[tuple[str, float, int]]) -> None:
        now = self.clock.now_ms
        by: dict[str, list[tuple[float, int]]] = {}
        for sym, price, back in ticks:
            ts = now + back
            by.setdefault(sym, []).append((price, ts))
            key = ("ex1", sym, ts // 60_000 * 60_000)
            self.sent[key] += 1
            self.floor[key] += 1
        self.agg.fold(TickBatch("ex1", by, now, len(ticks)))

    @rule(
        sym=st.sampled_from(["BTCUSDT", "ETHUSDT"]),
        n=st.integers(min_value=1, max_value=5),
        back=st.integers(min_value=-70_000, max_value=0),
    )
    def send_same(self, sym: str, n: int, back: int) -> None:
        """Identical prices in the same millisecond: every one counts."""
        self.send([(sym, 2.0, back)] * n)

    @rule(ms=st.integers(min_value=20, max_value=40_000))
    def advance(self, ms: int) -> None:
        self.clock.now_ms += ms

    @rule(into=st.integers(min_value=0, max_value=2_500))
    def to_next_minute(self, into: int) -> None:
        """Just past a minute boundary: inside the grace, where a crash hurt most."""
        self.clock.now_ms = (self.clock.now_ms // 60_000 + 1) * 60_000 + into

    @rule()
    def flush(self) -> None:
        self._run(self.agg.flush())
        self._run(self._writer_flush())

    async def _writer_flush(self) -> None:
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            await asyncio.wait_for(self.writer.flush(), 1.0)

    @rule(down=st.booleans())
    def store_switch(self, down: bool) -> None:
        self.store.down = down

    @rule(down=st.booleans())
    def cache_switch(self, down: bool) -> None:
        self.cache.down = down

    @rule(wipe_cache=st.booleans(), partial=st.booleans())
    def crash_and_restart(self, wipe_cache: bool, partial: bool) -> None:
        """SIGKILL: memory is gone; the cache (unless wiped), store and spill file remain."""
        if partial and not wipe_cache:
            for k in list(self.cache.seconds)[::2]:  # the cache lost part of what it had
                del self.cache.seconds[k]
        if wipe_cache:
            self.cache.wipe()
        durable = self._durable_now()
        task = self.writer._task
        if task is not None:
            task.cancel()
            self._run(asyncio.gather(task, return_exceptions=True))
        self.floor = durable
        self.crashed = True
        self._start()

    def _durable_now(self) -> Counter[Key]:
        cached: Counter[Key] = Counter()
        for (ex, sym, sec), b in self.cache.seconds.items():
            cached[(ex, sym, sec // 60 * 60_000)] += b.count
        out: Counter[Key] = Counter()
        for key in {*cached, *self.store.rows}:
            row = self.store.rows.get(key)
            out[key] = max(cached[key], row.count if row else 0)
        return out

    @rule()
    def settle(self) -> None:
        """Everything up, time past every grace, flush: rows must now be complete."""
        self.store.down = False
        self.cache.down = False
        self.clock.now_ms += 3_000
        self._run(self.agg.flush())
        self._run(self.agg.flush(final=True))
        self._run(self._writer_flush())
        for key, sent in self.sent.items():
            row = self.store.rows.get(key)
            got = row.count if row else 0
            if not self.crashed:
                assert got == sent, (key, got, sent)
            else:
                assert got >= min(self.floor[key], sent), (key, got, self.floor[key])

    @invariant()
    def never_shrinks_never_doubles(self) -> None:
        for key, row in self.store.rows.items():
            assert row.count >= self.seen.get(key, 0), (key, row.count, self.seen[key])
            assert row.count <= self.sent[key], (key, row.count, self.sent[key])
            self.seen[key] = row.count


TestExactness = ExactnessMachine.TestCase
TestExactness.settings = settings(
    max_examples=400,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
