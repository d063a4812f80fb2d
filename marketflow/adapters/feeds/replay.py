"""File sources: replay a JSONL tick capture or a FIX log through the live pipeline.

The file's format is recognised from its first bytes. JSONL lines are put in chunks, exactly
as the TCP reader puts them, and go through the same JsonLinesParser; FIX messages (SOH or
``|`` separated) are framed and validated by the FixFramer and their market-data messages
go through the FIX venue's parser. Pacing follows the capture's own timestamps (``timestamp``
of a JSON line, SendingTime of a FIX message), scaled by ``speed``; ``speed = 0`` replays
as fast as the pipeline takes it. The producer returns when the file ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson

from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.adapters.fix.codec import SOH, FixFramer, FrameReject
from marketflow.adapters.fix.timestamps import parse_utc
from marketflow.domain.feeds import Clock, FeedStatus, Source
from marketflow.domain.ticks import MAX_PRICE
from marketflow.settings import ExchangeSettings

log = logging.getLogger("marketflow.feeds.replay")

FileFormat = Literal["json", "fix"]
Sleep = Callable[[float], Awaitable[None]]
Unit = tuple[int | None, bytes]
"""One line or message with its capture timestamp (None: none readable, no pacing)."""

READ_BLOCK = 1 << 20
CHUNK_BYTES = 1 << 16  # what the TCP reader puts per read: same batch sizes downstream
_FIX_BEGIN = re.compile(rb"8=FIXT?\.\d\.\d[A-Z0-9]{0,3}([\x01|])")
_FIX_LINE_END = re.compile(rb"(\x0110=\d{3})\x01?\r?\n")
_MD_TYPES = (b"W", b"X")


def detect_format(head: bytes) -> tuple[FileFormat, bool]:
    """The format of a file starting with ``head``, and whether FIX uses ``|`` separators."""
    m = _FIX_BEGIN.search(head)
    if m is not None and not head.lstrip().startswith(b"{"):
        return "fix", m.group(1) == b"|"
    return "json", False


def _json_ts(line: bytes) -> int | None:
    try:
        ts = orjson.loads(line)["timestamp"]
    except (orjson.JSONDecodeError, TypeError, KeyError, IndexError):
        return None
    return ts if type(ts) is int else None


def _fix_field(frame: bytes, tag: bytes) -> bytes | None:
    start = frame.find(b"\x01" + tag + b"=")
    if start < 0:
        return None
    start += len(tag) + 2
    return frame[start : frame.find(SOH, start)]


class ReplayProducer:
    """Reads a capture file and puts its lines (JSON) or market-data frames (FIX) in chunks."""

    def __init__(
        self,
        path: Path,
        speed: float,
        clock: Clock,
        *,
        fmt: FileFormat = "json",
        pipes: bool = False,
        sleep: Sleep = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        max_message_bytes: int = 65536,
    ) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self.path = path
        self.speed = speed
        self.fmt = fmt
        self.pipes = pipes
        self.units = 0  # lines or messages put
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._framer = FixFramer(max_message_bytes)
        self._origin: tuple[int, float] | None = None  # (first capture ms, monotonic then)

    async def run(self, out: asyncio.Queue[tuple[Any, int]], status: FeedStatus) -> None:
        """Replay the whole file, then return (``RunningSource.finished()`` sees the end)."""
        status.address = str(self.path)
        status.connect_attempts += 1
        try:
            f = await asyncio.to_thread(self.path.open, "rb")
        except OSError as exc:
            status.last_error = f"{type(exc).__name__}: {exc}"
            log.error("replay_failed path=%s error=%s", self.path, exc)  # noqa: TRY400
            return
        status.connected = True
        log.info("replay_started path=%s format=%s speed=%g", self.path, self.fmt, self.speed)
        try:
            rest = b""
            while True:
                block = await asyncio.to_thread(f.read, READ_BLOCK)
                status.bytes_in += len(block)
                data = rest + block
                if block:
                    cut = data.rfind(b"\n") + 1  # whole lines only; a FIX stream may have none
                    if self.fmt == "fix" and cut == 0:
                        cut = len(data)
                    data, rest = data[:cut], data[cut:]
                await self._emit(data, out, status)
                if not block:
                    break
        finally:
            await asyncio.to_thread(f.close)
            status.connected = False
        log.info("replay_finished path=%s units=%d chunks=%d", self.path, self.units, status.chunks)

    async def _emit(self, data: bytes, out: asyncio.Queue[tuple[Any, int]], st: FeedStatus) -> None:
        if self.fmt == "json" and self.speed == 0:
            await self._put_json_fast(data, out, st)
            return
        units = self._fix_units(data, st) if self.fmt == "fix" else self._json_units(data)
        group: list[bytes] = []
        size = 0
        group_ts: int | None = None
        for ts, raw in units:
            if group and (size >= CHUNK_BYTES or (ts is not None and ts != group_ts)):
                await self._put(group, out, st)
                group, size = [], 0
            if ts is not None and ts != group_ts:
                await self._pace(ts)
                group_ts = ts
            group.append(raw)
            size += len(raw)
        if group:
            await self._put(group, out, st)

    async def _put_json_fast(
        self, data: bytes, out: asyncio.Queue[tuple[Any, int]], st: FeedStatus
    ) -> None:
        """As fast as possible: line-aligned 64 KiB slices, no per-line work here."""
        pos, end = 0, len(data)
        while pos < end:
            cut = data.rfind(b"\n", pos, pos + CHUNK_BYTES) + 1
            if cut <= pos:  # one line longer than a chunk (the parser judges it)
                nl = data.find(b"\n", pos + CHUNK_BYTES)
                cut = end if nl < 0 else nl + 1
            chunk = data[pos:cut]
            self.units += chunk.count(b"\n")
            st.chunks += 1
            await out.put((chunk, self._clock()))
            pos = cut

    async def _put(
        self, group: list[bytes], out: asyncio.Queue[tuple[Any, int]], st: FeedStatus
    ) -> None:
        self.units += len(group)
        st.chunks += 1
        item: object = group if self.fmt == "fix" else b"".join(group)
        await out.put((item, self._clock()))

    async def _pace(self, ts: int) -> None:
        """Sleep until ``ts`` is due: the capture's spacing divided by ``speed``."""
        if self.speed == 0:
            return
        if self._origin is None:
            self._origin = (ts, self._monotonic())
            return
        first_ts, started = self._origin
        delay = started + (ts - first_ts) / 1000 / self.speed - self._monotonic()
        if delay > 0:
            await self._sleep(delay)

    def _json_units(self, data: bytes) -> list[Unit]:
        return [(_json_ts(line), line + b"\n") for line in data.split(b"\n") if line.strip()]

    def _fix_units(self, data: bytes, st: FeedStatus) -> list[Unit]:
        if self.pipes:
            # Checksums were computed over SOH: convert before framing.
            data = data.replace(b"|", SOH)
        data = _FIX_LINE_END.sub(rb"\1" + SOH, data)  # one message per line: drop the newlines
        units: list[Unit] = []
        for frame in self._framer.feed(data):
            if isinstance(frame, FrameReject):
                if frame.raw.strip():  # blank lines between messages are not errors
                    st.rejects.add(frame.reason, frame.raw)
                continue
            if _fix_field(frame, b"35") not in _MD_TYPES:
                continue  # session messages (logon, heartbeats) carry no prices
            try:
                ts: int | None = parse_utc(_fix_field(frame, b"52") or b"")
            except ValueError:
                ts = None  # the parser rejects it; it is not a pacing point
            units.append((ts, frame))
        return units


def build_file_source(
    settings: ExchangeSettings, pairs: Sequence[str], clock: Clock, max_price: float = MAX_PRICE
) -> Source[Any]:
    """A ``type = "file"`` source; the parser follows the file's format (JSONL or FIX log).

    Reads the first 4 KiB of the file to tell the format; an unreadable file gives a JSON
    source whose producer reports the error in the feed status.
    """
    assert settings.path is not None  # ExchangeSettings guarantees it for type = "file"
    path = settings.path
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    fmt, pipes = detect_format(head)
    status = FeedStatus(name=settings.name, protocol="file", address=str(path))
    producer = ReplayProducer(path, settings.speed, clock, fmt=fmt, pipes=pipes)
    if fmt == "fix":
        fix_parser = FixMarketDataParser(settings.name, pairs, status.rejects)
        return Source(status=status, producer=producer, parser=fix_parser)
    json_parser = JsonLinesParser(
        settings.name, frozenset(pairs), status.rejects, max_price=max_price
    )
    return Source(status=status, producer=producer, parser=json_parser)
