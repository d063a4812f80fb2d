"""The stream hub: ticks, world view (BBO, book), minute rows and venue status, fanned out to
WebSocket and SSE subscribers at a fixed cadence.

Publishers (the aggregator's flush, the minute writer after a write, the world view's change
listener, the venue status) only record the new state and mark its key dirty: no await, no
serialisation, O(changed). Once per cadence (``stream.cadence_hz``, default 10 Hz) one task
builds each changed payload once (orjson bytes), assembles one frame per channel shared by
every client subscribed to all symbols, and hands each client its frames. Cost therefore grows
with clients x cadence, never with the tick rate.

No publisher and no cadence ever awaits a client: each client has its own sender task. A
client whose transport still holds bytes (or whose sender is mid-send) is "behind": its
updates wait in a pending map where the latest value per (channel, key) wins (each overwrite
is counted as conflated). Its backlog is the bytes its transport holds plus every update
queued for it since it last caught up; past ``max_buffered_bytes`` it is closed with 1008.
Memory per client stays bounded by conflation whatever the backlog.

Message shapes (docs/protocols.md, README "Streaming"): every server message is one JSON
object with ``type``: ``subscribed``, ``snapshot``, ``update`` or ``error``; snapshots and
updates carry ``channel``, ``seq`` (the hub's delivery round) and ``data`` keyed by symbol
(by venue on ``status``), each payload with its own ``seq``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import orjson

from marketflow.domain.aggregates import LatestPrice, MinuteRow
from marketflow.settings import StreamSettings

log = logging.getLogger("marketflow.stream")

CHANNELS = ("ticks", "bbo", "book", "aggregates", "status")
VIEW_CHANNELS = ("bbo", "book")
SLOW_CLOSE_CODE = 1008  # policy violation: what tardis-machine sends a slow client
GOING_AWAY_CODE = 1001
MAX_NAME = 64  # symbols and venues in client messages longer than this are refused

Clock = Callable[[], int]
"""Wall clock in Unix epoch milliseconds."""


class WorldViewLike(Protocol):
    """What the hub needs of the cross-venue world view (app/world_view.py, issue 13)."""

    def symbols(self) -> list[str]: ...

    def bbo(self, symbol: str) -> dict[str, object] | None: ...

    def book(self, symbol: str, depth: int) -> dict[str, object] | None: ...

    def subscribe(self, listener: Callable[[str], None]) -> None: ...

    def subscribe_status(self, listener: Callable[[str, str], None]) -> None: ...


class Frame(NamedTuple):
    """One server message: ``body`` is the whole JSON object, shared by every client it goes
    to. ``channel`` is empty for control messages (subscribed, error). ``wire``: the sinks'
    encodings of it (a WebSocket frame, an SSE event), built by the first sink that sends it
    and reused by every other."""

    kind: str
    channel: str
    seq: int
    body: bytes
    wire: dict[str, bytes]


class Bundle:
    """One round's shared update frames for every client of one plan (the same channels,
    each on all symbols): built once, encoded once per kind of sink (``wires``), written
    to each such client in one write, and counted once for all of them (``sent``)."""

    __slots__ = ("frames", "nbytes", "sent", "wires")

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self.nbytes = sum(len(f.body) for f in frames)
        self.sent = 0  # clients it was written to
        self.wires: dict[str, bytes] = {}


class Sink(Protocol):
    """Where one client's frames go: the entrypoints adapt a WebSocket or an SSE response."""

    async def send(self, frame: Frame) -> None:
        """Write one frame; raises ConnectionError once the client is gone."""
        ...

    def try_send(self, frame: Frame) -> bool:
        """Write one frame now, without waiting, when the transport holds nothing; False
        when it cannot (the frame then goes through ``send``)."""
        ...

    def try_send_bundle(self, bundle: Bundle) -> bool:
        """Write ``bundle``'s frames now in one write, without waiting, when the transport
        holds nothing; False when it cannot (nothing is written then)."""
        ...

    def buffered(self) -> int:
        """Bytes written to the transport that the kernel has not taken yet."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the connection (bounded in time, even for a client that never reads)."""
        ...


class SubscribeError(Exception):
    """A subscribe or unsubscribe the hub refuses (the client gets an error frame)."""


class Refused(Exception):
    """No room for one more connection (``stream.max_connections``)."""


class Subscriber:
    """One connected client: what it subscribed to and what waits to be sent to it."""

    __slots__ = (
        "behind",
        "closed",
        "conflated",
        "done",
        "frames_sent",
        "ident",
        "outbox",
        "pending",
        "plan",
        "sending",
        "sink",
        "subs",
        "task",
        "wake",
    )

    def __init__(self, ident: int, sink: Sink) -> None:
        self.ident = ident
        self.sink = sink
        self.subs: dict[str, set[str] | None] = {}  # channel -> symbols, None: all of them
        # The channels, in CHANNELS order, when every one is on all symbols: such a client
        # takes the round's shared frames as they are (deliver's fast path); else None.
        self.plan: tuple[str, ...] | None = None
        self.outbox: deque[Frame] = deque()
        self.pending: dict[str, dict[str, bytes]] = {}  # conflated updates while behind
        self.behind = 0  # bytes queued since the client last caught up
        self.sending = False
        self.closed = False
        self.conflated = 0
        self.frames_sent = 0
        self.wake = asyncio.Event()
        self.done = asyncio.Event()  # set once the hub has let the client go
        self.task: asyncio.Task[None] | None = None

    def replan(self) -> None:
        subs = self.subs
        if subs and all(v is None for v in subs.values()):
            self.plan = tuple(c for c in CHANNELS if c in subs)
        else:
            self.plan = None

    def subscriptions(self) -> int:
        return sum(1 if s is None else len(s) for s in self.subs.values())

    def wants(self, channel: str, key: str) -> bool:
        s = self.subs.get(channel, ())
        return s is None or key in s

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing being written, nothing left in the transport."""
        return not self.outbox and not self.sending and self.sink.buffered() == 0


def _key_json(key: str) -> bytes:
    return orjson.dumps(key)


def _frame(kind: str, channel: str, seq: int, parts: Iterable[tuple[bytes, bytes]]) -> Frame:
    """A snapshot or update frame assembled from already serialised payloads (no encoding
    of the payloads again: each was built once for every client)."""
    data = b",".join(k + b":" + v for k, v in parts)
    head = b'{"type":"%s","channel":"%s","seq":%d,"data":{' % (
        kind.encode(),
        channel.encode(),
        seq,
    )
    return Frame(kind, channel, seq, head + data + b"}}", {})


class StreamHub:
    """Fan-out of the channels in ``CHANNELS`` to subscribers, coalesced at a cadence."""

    def __init__(
        self,
        settings: StreamSettings,
        symbols: Sequence[str],
        clock: Clock,
        *,
        view: WorldViewLike | None = None,
        status_poll: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """``symbols``: the configured pairs (``view.symbols()`` joins them when a world view
        is wired). ``status_poll``: venue -> "up" | "down" | "stale", read once per cadence
        (used when no world view reports the status)."""
        self._settings = settings
        self._clock = clock
        self._symbols = list(dict.fromkeys(symbols))
        self._view = view
        self._status_poll = status_poll
        self._seq = clock()  # rounds count up from the start time: ids grow across restarts
        self._ticks: dict[str, dict[str, tuple[float, int]]] = {}
        self._rows: dict[str, dict[str, MinuteRow]] = {}
        self._status: dict[str, tuple[str, int]] = {}
        self._dirty: dict[str, set[str]] = {c: set() for c in CHANNELS}
        # the seq of the hub's own channels (ticks, aggregates, status): one counter, taken
        # at publish time, from the start time up (it grows across restarts too)
        self._version = self._seq
        self._versions: dict[str, dict[str, int]] = {c: {} for c in CHANNELS}
        self._payloads: dict[str, dict[str, bytes]] = {c: {} for c in CHANNELS}
        self._keys: dict[str, bytes] = {}
        self._clients: dict[int, Subscriber] = {}
        self._subscribed: set[str] | None = None  # channels anyone is on; None: recompute
        self._next_ident = 0
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        # figures for /health and /metrics
        self.frames_sent = 0
        self.bytes_sent = 0
        self.conflated = 0
        self.slow_closed = 0
        self.connections_refused = 0
        self.subscriptions_refused = 0
        self.bad_messages = 0
        self.rounds = 0
        self.deliver_s = 0.0  # time spent in deliver() (the cost on the ingest's loop)
        self.deliver_max_s = 0.0
        # /metrics per channel ("control": subscribed, unsubscribed and error frames)
        self.frames_by_channel: dict[str, int] = dict.fromkeys((*CHANNELS, "control"), 0)
        self.conflated_by_channel: dict[str, int] = dict.fromkeys(CHANNELS, 0)
        if view is not None:
            view.subscribe(self.view_changed)
            view.subscribe_status(self.publish_status)

    # -- publishers: record and mark dirty, nothing else ------------------------------------

    def publish_latest(self, prices: Iterable[LatestPrice]) -> None:
        """The latest price of each (exchange, symbol) changed by one aggregator flush."""
        dirty = self._dirty["ticks"]
        ticks = self._ticks
        versions = self._versions["ticks"]
        self._version += 1
        version = self._version
        for lp in prices:
            per = ticks.get(lp.symbol)
            if per is None:
                per = ticks[lp.symbol] = {}
            per[lp.exchange] = (lp.price, lp.timestamp_ms)
            dirty.add(lp.symbol)
            versions[lp.symbol] = version

    def publish_rows(self, rows: Iterable[MinuteRow]) -> None:
        """Minute rows the minute writer has just written (or rewritten), one batch."""
        dirty = self._dirty["aggregates"]
        versions = self._versions["aggregates"]
        self._version += 1
        for row in rows:
            per = self._rows.get(row.symbol)
            if per is None:
                per = self._rows[row.symbol] = {}
            per[row.exchange] = row
            dirty.add(row.symbol)
            versions[row.symbol] = self._version

    def publish_status(self, venue: str, state: str) -> None:
        """A venue's link went ``up``, ``down`` or ``stale`` (unchanged states are ignored)."""
        held = self._status.get(venue)
        if held is not None and held[0] == state:
            return
        self._status[venue] = (state, self._clock())
        self._dirty["status"].add(venue)
        self._version += 1
        self._versions["status"][venue] = self._version

    def view_changed(self, symbol: str) -> None:
        """The world view's listener: its BBO or book of ``symbol`` changed."""
        self._dirty["bbo"].add(symbol)
        self._dirty["book"].add(symbol)

    # -- payloads ---------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        k = self._keys.get(key)
        if k is None:
            k = self._keys[key] = _key_json(key)
        return k

    def _build(self, channel: str, key: str) -> bytes | None:
        """The payload of one (channel, key) now, serialised; None when there is none."""
        seq = self._versions[channel].get(key, 0)
        doc: dict[str, Any] | None
        if channel == "ticks":
            per = self._ticks.get(key)
            doc = None if per is None else {"seq": seq, "prices": {
                ex: {"price": p, "timestamp_ms": t} for ex, (p, t) in per.items()}}  # fmt: skip
        elif channel == "aggregates":
            rows = self._rows.get(key)
            doc = None if rows is None else {"seq": seq, "rows": {
                ex: {"minute_ms": r.minute_ms, "average": r.average, "low": r.low,
                     "high": r.high, "count": r.count, "complete": r.complete}
                for ex, r in rows.items()}}  # fmt: skip
        elif channel == "status":
            held = self._status.get(key)
            doc = None if held is None else {"seq": seq, "state": held[0], "since_ms": held[1]}
        elif self._view is None:
            doc = None
        elif channel == "bbo":
            doc = self._view.bbo(key)
        else:
            doc = self._view.book(key, self._settings.book_depth)
        return None if doc is None else orjson.dumps(doc)

    def _payload(self, channel: str, key: str) -> bytes | None:
        """The payload as last delivered, or built now if it changed since (snapshots). Not
        kept: the clients subscribed before still need the change in the next round, so a new
        subscriber may see it again there (same ``seq``)."""
        cached = self._payloads[channel].get(key)
        if cached is not None and key not in self._dirty[channel]:
            return cached
        return self._build(channel, key)

    def known_keys(self, channel: str) -> list[str]:
        """Every key of ``channel`` "all symbols" means now."""
        if channel == "status":
            return list(self._status)
        if channel == "ticks":
            return list(dict.fromkeys([*self._symbols, *self._ticks]))
        if channel == "aggregates":
            return list(dict.fromkeys([*self._symbols, *self._rows]))
        extra = self._view.symbols() if self._view is not None else []
        return list(dict.fromkeys([*self._symbols, *extra]))

    # -- connections and subscriptions ------------------------------------------------------

    def connect(self, sink: Sink) -> Subscriber:
        """A new client (it has subscribed to nothing yet); Refused past the cap."""
        if self._closed or len(self._clients) >= self._settings.max_connections:
            self.connections_refused += 1
            raise Refused("too many stream connections")
        self._next_ident += 1
        sub = Subscriber(self._next_ident, sink)
        self._clients[sub.ident] = sub
        sub.task = asyncio.create_task(self._send_loop(sub), name=f"stream-send-{sub.ident}")
        return sub

    def disconnect(self, sub: Subscriber) -> None:
        """The client went away (or its handler ends): forget it, stop its sender."""
        if self._clients.pop(sub.ident, None) is None and sub.closed:
            return
        sub.closed = True
        self._subscribed = None
        sub.outbox.clear()
        sub.pending.clear()
        # Woken, the sender ends; one stuck in a send is not cancelled (aiohttp's drain
        # waiter is shared with the close that follows): it ends when the close does.
        sub.wake.set()
        sub.done.set()

    def check(self, channels: object, symbols: object) -> tuple[list[str], list[str] | None]:
        """Validate a subscription request: (channels, symbols or None for all)."""
        if not isinstance(channels, list) or not channels:
            raise SubscribeError("channels must be a non-empty list of channel names")
        wanted: list[str] = []
        for c in channels:
            if not isinstance(c, str) or c not in CHANNELS:
                shown = str(c)[:MAX_NAME]
                raise SubscribeError(f"unknown channel {shown!r}: use {', '.join(CHANNELS)}")
            if c not in wanted:
                wanted.append(c)
        if symbols is None:
            return wanted, None
        if not isinstance(symbols, list) or not symbols:
            raise SubscribeError("symbols must be a non-empty list (or omitted: all symbols)")
        names: list[str] = []
        known = set(self._symbols)
        if self._view is not None:
            known.update(self._view.symbols())
        for s in symbols:
            if not isinstance(s, str) or not s or len(s) > MAX_NAME:
                raise SubscribeError("each symbol must be a non-empty string")
            up = s.upper()
            if up not in known:
                raise SubscribeError(f"unknown symbol {s!r}")
            if up not in names:
                names.append(up)
        return wanted, names

    def subscribe(
        self, sub: Subscriber, channels: Sequence[str], symbols: Sequence[str] | None
    ) -> None:
        """Add (channels x symbols) to ``sub`` and queue one snapshot per channel of what it
        added, before any update. Past ``max_subscriptions`` nothing is added."""
        sub.subs = self.plan(sub, channels, symbols)
        sub.replan()
        self._subscribed = None
        self._queue(sub, self._control(
            "subscribed", {"channels": list(channels), "symbols": symbols}))  # fmt: skip
        for c in channels:
            keys = self.known_keys(c) if c == "status" or symbols is None else list(symbols)
            parts = []
            waiting = sub.pending.get(c)
            for key in keys:
                if waiting is not None:
                    waiting.pop(key, None)  # the snapshot is newer than any update held
                body = self._payload(c, key)
                if body is not None:
                    parts.append((self._key(key), body))
            self._queue(sub, _frame("snapshot", c, self._seq, parts))

    def plan(
        self, sub: Subscriber, channels: Sequence[str], symbols: Sequence[str] | None
    ) -> dict[str, set[str] | None]:
        """What ``sub`` would be subscribed to after adding (channels x symbols); raises
        SubscribeError (counted as refused) past ``max_subscriptions``."""
        trial = {c: (None if s is None else set(s)) for c, s in sub.subs.items()}
        for c in channels:
            if c == "status" or symbols is None:
                trial[c] = None  # venues are not symbols: status is always every venue
            elif c not in trial:
                trial[c] = set(symbols)
            elif (held := trial[c]) is not None:
                held.update(symbols)
        count = sum(1 if s is None else len(s) for s in trial.values())
        if count > self._settings.max_subscriptions:
            self.subscriptions_refused += 1
            raise SubscribeError(
                f"too many subscriptions ({count} > {self._settings.max_subscriptions})"
            )
        return trial

    def unsubscribe(
        self, sub: Subscriber, channels: Sequence[str], symbols: Sequence[str] | None
    ) -> None:
        for c in channels:
            held = sub.subs.get(c, set())
            if symbols is None or c == "status":
                sub.subs.pop(c, None)
                sub.pending.pop(c, None)
                continue
            if held is None:  # "all" minus some: the rest of what all means now
                held = set(self.known_keys(c))
            held.difference_update(symbols)
            waiting = sub.pending.get(c)
            for s in symbols:
                if waiting is not None:
                    waiting.pop(s, None)
            if held:
                sub.subs[c] = held
            else:
                sub.subs.pop(c, None)
        sub.replan()
        self._subscribed = None
        self._queue(sub, self._control(
            "unsubscribed", {"channels": list(channels), "symbols": symbols}))  # fmt: skip

    def handle(self, sub: Subscriber, raw: str | bytes) -> None:
        """One client message: ``{"op": "subscribe"|"unsubscribe", "channels": [...],
        "symbols": [...]}``; anything else gets an error frame (the connection lives)."""
        try:
            op, channels, symbols = self._parse(raw)
            if op == "subscribe":
                self.subscribe(sub, channels, symbols)
            else:
                self.unsubscribe(sub, channels, symbols)
        except SubscribeError as exc:
            self.bad_messages += 1
            self._queue(sub, self._control("error", {"error": str(exc)[:300]}))

    def _parse(self, raw: str | bytes) -> tuple[str, list[str], list[str] | None]:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SubscribeError("message is not JSON") from exc
        if not isinstance(msg, dict):
            raise SubscribeError("message must be a JSON object")
        unknown = set(msg) - {"op", "channels", "symbols"}
        if unknown:
            raise SubscribeError(f"unknown field(s): {', '.join(sorted(unknown))[:100]}")
        op = msg.get("op")
        if op not in ("subscribe", "unsubscribe"):
            raise SubscribeError('op must be "subscribe" or "unsubscribe"')
        channels, symbols = self.check(msg.get("channels"), msg.get("symbols"))
        return op, channels, symbols

    def _control(self, kind: str, doc: dict[str, Any]) -> Frame:
        return Frame(kind, "", self._seq, orjson.dumps({"type": kind, **doc}), {})

    def _queue(self, sub: Subscriber, frame: Frame) -> None:
        """Write ``frame`` at once when the client has nothing waiting (no task switch, one
        write of bytes shared by every client), else leave it to the client's sender."""
        if sub.closed:
            return
        sub.behind += len(frame.body)
        if not sub.outbox and not sub.sending and sub.sink.try_send(frame):
            self._sent(sub, frame)
            return
        sub.outbox.append(frame)
        sub.wake.set()

    def _sent(self, sub: Subscriber, frame: Frame) -> None:
        """Count one frame written to ``sub``."""
        sub.frames_sent += 1
        self._count(frame, 1)

    def _count(self, frame: Frame, clients: int) -> None:
        """Count ``frame`` written to ``clients`` clients (the hub's figures)."""
        self.frames_sent += clients
        self.frames_by_channel[frame.channel or "control"] += clients
        self.bytes_sent += clients * len(frame.body)

    async def _send_loop(self, sub: Subscriber) -> None:
        """The only place that awaits this client's socket."""
        try:
            while not sub.closed:
                if not sub.outbox:
                    sub.wake.clear()
                    await sub.wake.wait()
                    continue
                frame = sub.outbox.popleft()
                sub.sending = True
                await sub.sink.send(frame)
                sub.sending = False
                self._sent(sub, frame)
        except ConnectionError:
            self.disconnect(sub)

    # -- delivery, once per cadence ---------------------------------------------------------

    def deliver(self) -> None:
        """One cadence: build each changed payload once, hand every client what changed of
        what it subscribed to (or conflate it while the client is behind), close clients too
        far behind. Synchronous: nothing here waits for a client.

        The fast path, inline here because it runs for every client every round: a client
        on all symbols of each of its channels with nothing waiting for it takes its plan's
        ``Bundle`` in one write; ``_offer`` handles every other case."""
        if self._status_poll is not None:
            for venue, state in self._status_poll().items():
                self.publish_status(venue, state)
        self._seq += 1
        self.rounds += 1
        changes = self._changes()
        shared: dict[str, Frame] = {}
        bundles: dict[tuple[str, ...], Bundle] = {}
        bound = self._settings.max_buffered_bytes
        for sub in list(self._clients.values()):
            if sub.closed or not sub.subs:
                continue
            plan = sub.plan
            bundle = None
            if plan is not None and not (sub.outbox or sub.sending or sub.pending):
                bundle = bundles.get(plan)
                if bundle is None:
                    bundle = bundles[plan] = Bundle(
                        [self._shared(c, changes[c], shared) for c in plan if c in changes]
                    )
            if bundle is not None and bundle.frames and sub.sink.try_send_bundle(bundle):
                sub.behind = bundle.nbytes  # as _queue counts: bytes since it caught up
                sub.frames_sent += len(bundle.frames)
                bundle.sent += 1
            else:
                self._offer(sub, changes, shared)
            if sub.sink.buffered() + sub.behind > bound:
                self._close_slow(sub)
        for bundle in bundles.values():
            for frame in bundle.frames:
                self._count(frame, bundle.sent)

    def _shared(self, channel: str, changed: dict[str, bytes], shared: dict[str, Frame]) -> Frame:
        """This round's update frame of ``channel`` for every client on all its symbols."""
        frame = shared.get(channel)
        if frame is None:
            parts = [(self._key(k), v) for k, v in changed.items()]
            frame = shared[channel] = _frame("update", channel, self._seq, parts)
        return frame

    def _changes(self) -> dict[str, dict[str, bytes]]:
        """channel -> key -> payload of what changed since the last round (built once)."""
        subscribed = self._subscribed
        if subscribed is None:
            subscribed = self._subscribed = {c for sub in self._clients.values() for c in sub.subs}
        changes: dict[str, dict[str, bytes]] = {}
        for channel in CHANNELS:
            dirty = self._dirty[channel]
            if not dirty:
                continue
            self._dirty[channel] = set()
            cache = self._payloads[channel]
            if channel not in subscribed:
                for key in dirty:  # nobody listens: rebuilt on demand (a snapshot)
                    cache.pop(key, None)
                continue
            changed: dict[str, bytes] = {}
            for key in dirty:
                body = self._build(channel, key)
                if body is None or cache.get(key) == body:
                    continue  # the view says it changed, but not what this channel shows
                cache[key] = changed[key] = body
            if changed:
                changes[channel] = changed
        return changes

    def _offer(
        self, sub: Subscriber, changes: dict[str, dict[str, bytes]], shared: dict[str, Frame]
    ) -> None:
        """Queue this round's changes for ``sub``, or conflate them while it is behind."""
        seq = self._seq
        caught_up = sub.idle
        if caught_up:
            sub.behind = 0
        for channel, changed in changes.items():
            if channel not in sub.subs:
                continue
            wanted = sub.subs[channel]
            if caught_up and not sub.pending:
                if wanted is None:  # every client on all symbols shares one frame
                    self._queue(sub, self._shared(channel, changed, shared))
                else:
                    parts = [(self._key(k), v) for k, v in changed.items() if k in wanted]
                    if parts:
                        self._queue(sub, _frame("update", channel, seq, parts))
                continue
            held = sub.pending.setdefault(channel, {})
            for key, body in changed.items():
                if wanted is not None and key not in wanted:
                    continue
                if key in held:  # an update it will never see: the newer one wins
                    sub.conflated += 1
                    self.conflated += 1
                    self.conflated_by_channel[channel] += 1
                held[key] = body
                sub.behind += len(body)
        if caught_up and sub.pending:
            self._release(sub, seq)

    def _release(self, sub: Subscriber, seq: int) -> None:
        """The client caught up: send what was conflated for it, one frame per channel."""
        pending, sub.pending = sub.pending, {}
        for channel, held in pending.items():
            if held and channel in sub.subs:
                parts = [(self._key(k), v) for k, v in held.items()]
                self._queue(sub, _frame("update", channel, seq, parts))

    def _close_slow(self, sub: Subscriber) -> None:
        self.slow_closed += 1
        log.warning(
            "stream_client_slow client=%d behind_bytes=%d conflated=%d action=close_1008",
            sub.ident,
            sub.behind + sub.sink.buffered(),
            sub.conflated,
        )
        self._let_go(sub, SLOW_CLOSE_CODE, "slow consumer")

    def _let_go(self, sub: Subscriber, code: int, reason: str) -> None:
        self.disconnect(sub)
        task = asyncio.create_task(sub.sink.close(code, reason), name=f"stream-close-{sub.ident}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stream-hub")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self._settings.cadence_hz
        next_at = loop.time()
        while True:
            next_at += period
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a long GC, a busy loop): no burst of rounds after
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)
            started = time.perf_counter()
            try:
                self.deliver()
            except Exception:  # a bug in one round must not end streaming; it is logged
                log.exception("stream_delivery_failed")
            took = time.perf_counter() - started
            self.deliver_s += took
            self.deliver_max_s = max(self.deliver_max_s, took)

    async def close_clients(self) -> None:
        """Close every client with 1001 (going away), e.g. before the HTTP server stops."""
        for sub in list(self._clients.values()):
            self._let_go(sub, GOING_AWAY_CODE, "server stopping")
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop delivering, close every client; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.close_clients()

    def stats(self) -> dict[str, Any]:
        """The /health (and /metrics) view of the hub."""
        per = dict.fromkeys(CHANNELS, 0)
        for sub in self._clients.values():
            for c in sub.subs:
                per[c] += 1
        return {
            "connections": len(self._clients),
            "subscribers": per,
            "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "conflated": self.conflated,
            "slow_closed": self.slow_closed,
            "connections_refused": self.connections_refused,
            "subscriptions_refused": self.subscriptions_refused,
            "bad_messages": self.bad_messages,
            "cadence_hz": self._settings.cadence_hz,
            "rounds": self.rounds,
            "deliver_ms_total": round(self.deliver_s * 1000, 1),
            "deliver_ms_max": round(self.deliver_max_s * 1000, 2),
        }


def feed_states(statuses: Mapping[str, Any]) -> dict[str, str]:
    """Venue states from the feeds' FeedStatus objects (name -> status): "up" when connected
    and fresh, "stale" when connected but silent, "down" otherwise."""
    return {
        name: ("down" if not st.connected else "stale" if st.stale else "up")
        for name, st in statuses.items()
    }
