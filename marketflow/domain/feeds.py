"""Feeds as the application sees them: a source (producer + parser) and its status.

The ports the feed adapters implement (``Producer``, ``Parser``) and what they report
(``FeedStatus``: connection, freshness, counts, shown by /health and the metrics). The ingest
pipeline (app/ingest.py) runs sources; adapters/feeds/ builds them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from marketflow.domain.ticks import RejectCounts, TickBatch

log = logging.getLogger("marketflow.feeds")


@dataclass(slots=True)
class FeedStatus:
    """Mutable status of one source, updated by its producer (connection) and workers (ticks)."""

    name: str
    protocol: str  # "json" | "fix" | "websocket" | "generator" | "file"
    address: str = ""
    connected: bool = False
    stale: bool = False
    reconnects: int = 0
    connect_attempts: int = 0
    last_error: str = ""
    last_tick_received_ms: int = 0
    ticks: int = 0
    chunks: int = 0
    bytes_in: int = 0
    rejects: RejectCounts = field(default_factory=RejectCounts)

    def __post_init__(self) -> None:
        if self.rejects.on_sample is None:
            self.rejects.on_sample = self._log_sample

    def connecting(self) -> None:
        """Count a connection attempt; every one after the first is also a reconnect."""
        self.reconnects += self.connect_attempts > 0
        self.connect_attempts += 1

    def _log_sample(self, reason: str, count: int, raw: bytes) -> None:
        log.warning(
            "input_rejected source=%s reason=%s count=%d sample=%r", self.name, reason, count, raw
        )

    def snapshot(self, now_ms: int, skew_s: float | None = None) -> dict[str, object]:
        """The /health view; ``skew_s`` is receipt time minus exchange time of the newest tick."""
        age = (now_ms - self.last_tick_received_ms) / 1000 if self.last_tick_received_ms else None
        return {
            "protocol": self.protocol,
            "address": self.address,
            "connected": self.connected,
            "stale": self.stale,
            "last_tick_age_s": age,
            "clock_skew_s": skew_s,
            "reconnects": self.reconnects,
            "last_error": self.last_error or None,
            "ticks": self.ticks,
            "rejected": self.rejects.total(),
            "rejected_by_reason": dict(self.rejects.counts),
        }


ItemT = TypeVar("ItemT")
ItemT_contra = TypeVar("ItemT_contra", contravariant=True)

Clock = Callable[[], int]
"""Wall clock in Unix epoch milliseconds (injected so tests control time)."""


class Producer(Protocol[ItemT]):
    """Puts ``(item, received_ms)`` on ``out`` until cancelled; handles its own reconnects."""

    async def run(self, out: asyncio.Queue[tuple[ItemT, int]], status: FeedStatus) -> None: ...


class Parser(Protocol[ItemT_contra]):
    def parse(self, item: ItemT_contra, received_ms: int) -> TickBatch: ...


@dataclass
class Source(Generic[ItemT]):
    """One exchange connection (or generator, or file) with its own queue and worker pool."""

    status: FeedStatus
    producer: Producer[ItemT]
    parser: Parser[ItemT]
