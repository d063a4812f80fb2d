"""Redis price cache (redis.asyncio + hiredis): latest prices and the per-second window.

Key layout (other tools read it; change it only with a new prefix):

``marketflow:latest`` (hash)
    field ``"{exchange}:{symbol}"``, value JSON ``{"price": float, "timestamp": int,
    "received": int}`` (Unix ms: exchange timestamp and local receipt time). A Lua script
    replaces a field only when the new ``timestamp`` is >= the stored one, so the newest
    exchange timestamp wins whichever writer (or retry) comes last. No expiry.

``marketflow:window:{exchange}:{symbol}:{minute_start_epoch_s}`` (hash, one per minute)
    field ``"{second}"`` (Unix epoch seconds), value ``"low,high,total,count"`` (floats in
    their shortest round-trip form, as ``repr`` or JSON writes them, count an integer). A
    second is always written whole, so it is overwritten, never incremented. Each key
    expires ``retention_s + 120`` s after a write (its TTL is renewed once half of it has
    passed).

``marketflow:marks`` (hash)
    field source name, value ``"{position},{made_ms}"``: where the source resumes (FIX: the
    next expected inbound MsgSeqNum), written in the same transaction as the seconds it
    covers.

``marketflow:alive`` (string)
    set once when missing; a write that finds it missing tells the daemon that Redis lost
    its data (restarted without persistence), and the daemon writes everything it holds.

``marketflow:staging:{token}:window:...`` (hash, short-lived)
    a write of more than ``STAGE_ABOVE_SECONDS`` seconds goes in scripts of
    ``STAGE_CHUNK_SECONDS`` to these keys first, then one script renames them to their
    minute keys with the latest prices, marks and sentinel. That is a refill after an
    outage (``write(whole=True)``; with 500 pairs x 10 exchanges, 3 million seconds), or a
    flush of a backfill's changed seconds, whose staging keys start as a COPY of their
    minute keys. One script of everything ran past Redis's 5 s script limit (other
    clients get BUSY meanwhile) and the daemon's 2 s read timeout, so the write never
    landed and the cache was taken as down; staged, the marks still become visible only
    with the seconds they cover, and a write cut short leaves only staging keys, which
    expire as the minute keys would have. Writes are one at a time (the flush lock), so nothing
    changes a minute key between its copy and the rename.

A ``write()`` is one round trip, one script (atomic, like MULTI/EXEC): every latest price,
HSET (and EXPIRE once per half TTL) per minute key, the marks, and the sentinel. It goes over
a connection of its own (``WriteLink``), not through the client's pool: redis-py 8 spends
~25 us of CPU per pooled command on pool bookkeeping and observability events (a write took
90 us through the pool, 65 us on its own connection), and the flusher sends hundreds of
writes a second.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

from marketflow.domain.aggregates import LatestPrice, Mark, SecondBucket, SecondRow
from marketflow.domain.errors import CacheUnavailable
from marketflow.lifecycle import Closing
from marketflow.loop_slices import Slices
from marketflow.settings import RedisSettings

log = logging.getLogger("marketflow.redis")

LATEST_KEY = "marketflow:latest"
WINDOW_PREFIX = "marketflow:window:"
MARKS_KEY = "marketflow:marks"
ALIVE_KEY = "marketflow:alive"
STAGING_PREFIX = "marketflow:staging:"  # outside WINDOW_PREFIX: never loaded as a window
STAGE_ABOVE_SECONDS = 50_000  # larger writes are staged (~45 ms of Redis's time in one)
STAGE_CHUNK_SECONDS = 10_000  # ~20 ms of Redis's time, and of the loop's, per staging script
EXPIRY_MARGIN_S = 120
ENCODE_PART_SECONDS = 2048  # seconds encoded between two looks at the loop's slice clock
SCAN_COUNT = 1000
LOAD_CHUNK_KEYS = 200  # minute keys read (and parsed) per round trip by load(): ~12,000 seconds

# One script is one write: atomic like MULTI/EXEC (the marks never become visible without
# the seconds they cover), and one command for redis-py to pack instead of two per minute key
# (redis-py spends ~30 us a command: a 25-command MULTI took ~1 ms, most of a flush).
# Its arguments are three documents, each built by one orjson call, and the script does the
# per-item string work on Redis's core instead of the daemon's (with 5,000 pairs changed per
# flush, building each value in Python was 2.4 us a pair, most of a flush):
# KEYS: latest, alive, marks, then the minute keys.
# ARGV[1]: ``[fields, minutes, marks]``: the latest prices' fields in order, one
#   ``[ttl, n]`` per minute key (its next ``n`` seconds; ttl 0: keep the one it has), marks a
#   flat [field, value, ...] list.
# ARGV[2]: ``[[price, timestamp, received], ...]`` as orjson writes it; the script copies
#   each number's text into the value, so a price keeps orjson's shortest round-trip form
#   (cjson would decode it to a double and print 14 digits).
# ARGV[3]: ``[[second, low, high, total, count], ...]`` the same way, grouped by minute key:
#   field ``second``, value the text ``low,high,total,count``.
# ARGV[4] (optional): ``n`` staged keys to publish first: the last 2n KEYS are (staging,
#   minute key) pairs, renamed (a staging key has its minute key's TTL already); when one
#   is gone (it expired, Redis restarted) nothing is written and the script returns 2.
#   ``-1``: a staging write (its minute keys are staging keys; the sentinel is left alone)
#   whose last 2 x ARGV[5] KEYS are (minute key, staging key) pairs: each staging key
#   starts as a COPY of its minute key, so a staged write of changed seconds keeps the
#   minute's others.
# A latest value that is not ours (no numeric "timestamp") is replaced rather than blocking.
WRITE_SCRIPT = """
local staged = tonumber(ARGV[4] or '0')
if staged > 0 then
  local base = #KEYS - 2 * staged
  local stages = {}
  for j = 1, staged do
    stages[j] = KEYS[base + 2 * j - 1]
  end
  for j = 1, staged, 4000 do  -- EXISTS of many keys at once (unpack: <= 8000 values)
    local upto = math.min(j + 3999, staged)
    if redis.call('EXISTS', unpack(stages, j, upto)) ~= upto - j + 1 then
      return 2
    end
  end
  for j = 1, staged do
    redis.call('RENAME', stages[j], KEYS[base + 2 * j])
  end
end
if staged < 0 then
  local copies = tonumber(ARGV[5])
  local base = #KEYS - 2 * copies
  for j = 1, copies do
    redis.call('COPY', KEYS[base + 2 * j - 1], KEYS[base + 2 * j])
  end
end
local missing = false
if staged >= 0 then
  missing = redis.call('SET', KEYS[2], '1', 'NX')
end
local doc = cjson.decode(ARGV[1])
local fields = doc[1]
local i = 0
for price, ts, received in string.gmatch(ARGV[2], '%[([^,%[%]]+),([^,%[%]]+),([^,%[%]]+)%]') do
  i = i + 1
  local current = redis.call('HGET', KEYS[1], fields[i])
  local newer = true
  if current then
    local held = tonumber(string.match(current, '"timestamp"%s*:%s*(%-?%d+)'))
    if held then
      newer = held <= tonumber(ts)
    end
  end
  if newer then
    redis.call('HSET', KEYS[1], fields[i],
      '{"price":' .. price .. ',"timestamp":' .. ts .. ',"received":' .. received .. '}')
  end
end
local seconds = string.gmatch(ARGV[3], '%[(%d+),([^%[%]]+)%]')
for k, m in ipairs(doc[2]) do
  local args = {}
  for j = 1, m[2] do
    local second, value = seconds()
    args[2 * j - 1] = second
    args[2 * j] = value
  end
  redis.call('HSET', KEYS[k + 3], unpack(args))
  if m[1] > 0 then
    redis.call('EXPIRE', KEYS[k + 3], m[1])
  end
end
if #doc[3] > 0 then
  redis.call('HSET', KEYS[3], unpack(doc[3]))
end
if missing then
  return 1
end
return 0
"""

# Connection, timeout and OS errors mean "down now"; any other RedisError (WRONGTYPE from a
# foreign key in our namespace, OOM) also makes the cache unusable until someone acts.
CACHE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisError,
    OSError,
    TimeoutError,
)


def window_key(exchange: str, symbol: str, minute_start_s: int) -> str:
    return f"{WINDOW_PREFIX}{exchange}:{symbol}:{minute_start_s}"


def _pack(args: Sequence[str | bytes | int]) -> bytes:
    """One command in RESP, as redis-py's ``pack_command`` makes it, in a fraction of its
    time: the text arguments (thousands of minute keys) are framed by one f-string each and
    encoded at once; their lengths are those of the str, so a non-ASCII one takes the exact
    path."""
    chunks: list[bytes] = [b"*%d\r\n" % len(args)]
    text: list[str] = []
    for arg in args:
        if isinstance(arg, bytes):
            if text:
                chunks.append(_framed(text))
                text = []
            chunks += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        else:
            s = arg if isinstance(arg, str) else str(arg)
            text.append(f"${len(s)}\r\n{s}\r\n")
    if text:
        chunks.append(_framed(text))
    return b"".join(chunks)


def _fields(latest: Sequence[LatestPrice]) -> list[str]:
    """The latest prices' fields in ``marketflow:latest``, in order."""
    return [f"{p[0]}:{p[1]}" for p in latest]


def _flat_marks(marks: Mapping[str, Mark] | None) -> list[str]:
    """Marks as the script's flat [field, value, ...] list."""
    flat: list[str] = []
    for src, (pos, made) in (marks or {}).items():
        flat += (src, f"{pos},{made}")
    return flat


def _framed(parts: list[str]) -> bytes:
    joined = "".join(parts)
    if joined.isascii():
        return joined.encode()
    out: list[bytes] = []  # a length in characters is not one in bytes: frame each again
    for part in parts:
        head, value = part[1:].split("\r\n", 1)
        raw = value[: int(head)].encode()
        out += (b"$%d\r\n" % len(raw), raw, b"\r\n")
    return b"".join(out)


class WriteLink:
    """One connection kept for the flusher's writes (one at a time: the aggregator's flush
    lock), made from the client's settings (address, password, db, timeouts, TLS).

    redis-py's connection does the protocol: it connects (and authenticates) on the first
    send, and disconnects itself on any error, so the next call reconnects. As the client's
    ``Retry(NoBackoff(), 1)``, a connection or timeout error is retried once at once: a
    connection Redis dropped (a restart) is replaced by the retry, and the write is
    idempotent (whole seconds, newest-wins latest prices, marks overwritten), so a retry of
    one that did run changes nothing."""

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        self._conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]

    async def call(self, *args: str | bytes | int) -> Any:
        packed = _pack(args)
        try:
            return await self._round_trip(packed)
        except (RedisConnectionError, RedisTimeoutError):
            return await self._round_trip(packed)

    async def _round_trip(self, packed: bytes) -> Any:
        conn = self._conn
        await conn.send_packed_command(packed, check_health=False)
        return await conn.read_response()

    async def aclose(self) -> None:
        await self._conn.disconnect()


class RedisPriceCache(Closing):
    """``PriceCache`` on Redis, in the layout documented above."""

    kind = "redis"

    def __init__(self, client: aioredis.Redis, retention_s: int, script_sha: str) -> None:
        self._client = client
        self._link = WriteLink(client)
        self._ttl = retention_s + EXPIRY_MARGIN_S
        # window key -> monotonic time of its last EXPIRE: a key is given its TTL again only
        # once half of it has passed, not at every flush (half the commands of a flush).
        self._expired_at: dict[str, float] = {}
        self._next_prune = 0.0
        self._sha = script_sha
        self._closed = False
        self.bad_values = 0  # unparsable cache entries skipped by load()

    async def write(
        self,
        latest: Sequence[LatestPrice],
        seconds: Collection[SecondRow],
        marks: Mapping[str, Mark] | None = None,
        *,
        whole: bool = False,
    ) -> bool:
        """One script: newest-wins latest prices, whole seconds, key expiry, marks.

        Returns True when the sentinel was missing: Redis lost what was written before.
        """
        if not latest and not seconds and not marks:
            return False
        self._check_open()
        if len(seconds) > STAGE_ABOVE_SECONDS:
            return await self._write_staged(latest, seconds, marks, whole=whole)
        lost = False
        now = time.monotonic()
        refresh_before = now - self._ttl / 2
        expired_at = self._expired_at
        fresh: list[str] = []
        keys: list[str] = [LATEST_KEY, ALIVE_KEY, MARKS_KEY]
        # One [ttl, n] per run of seconds of one minute key (a key may come back in a later
        # run: written twice in one script, the same as once). A flush's seconds come window
        # by window: a run goes on while the minute and the window's name objects do.
        minutes: list[list[int]] = []
        run = [0, 0]
        prev_ex = prev_sym = ""
        prev_minute = -1
        # The seconds' values, encoded a part at a time: the loop is served between parts.
        slices = Slices()
        parts: list[bytes] = []
        part: list[tuple[int, float, float, float, int]] = []
        for b in seconds:
            ex, sym, sec = b[0], b[1], b[2]
            minute = sec - sec % 60
            if minute == prev_minute and sym is prev_sym and ex is prev_ex:
                run[1] += 1
            else:
                prev_ex, prev_sym, prev_minute = ex, sym, minute
                key = window_key(ex, sym, minute)
                if key == keys[-1]:  # the same minute key, under other name objects
                    run[1] += 1
                else:
                    keys.append(key)
                    ttl = 0
                    if expired_at.get(key, -1.0) < refresh_before:
                        ttl = self._ttl
                        fresh.append(key)
                    run = [ttl, 1]
                    minutes.append(run)
            part.append(b[2:])
            if len(part) == ENCODE_PART_SECONDS:
                parts.append(orjson.dumps(part)[1:-1])
                part = []
                if slices.spent():
                    await slices.pause()
        if part:
            parts.append(orjson.dumps(part)[1:-1])
        argv = (
            orjson.dumps((_fields(latest), minutes, _flat_marks(marks))),
            orjson.dumps([p[2:] for p in latest]),
            b"[" + b",".join(parts) + b"]",
        )
        missing, lost = await self._run(keys, argv)
        lost = lost or missing == 1
        self._note_expiries(fresh, now, lost)
        return lost

    async def _run(self, keys: list[str], argv: Sequence[bytes | str]) -> tuple[Any, bool]:
        """The write script's reply, and whether Redis had lost the script (restarted)."""
        lost = False
        try:
            try:
                missing = await self._link.call("EVALSHA", self._sha, len(keys), *keys, *argv)
            except NoScriptError:
                # Redis restarted (its script cache is empty): load once more, apply once.
                lost = True
                self._sha = await self._link.call("SCRIPT", "LOAD", WRITE_SCRIPT)
                missing = await self._link.call("EVALSHA", self._sha, len(keys), *keys, *argv)
        except CACHE_ERRORS as exc:
            # Down, or e.g. WRONGTYPE: someone else's key in our namespace. Retried later.
            raise CacheUnavailable(f"redis: {_describe(exc)}") from exc
        return missing, lost

    async def _write_staged(
        self,
        latest: Sequence[LatestPrice],
        seconds: Collection[SecondRow],
        marks: Mapping[str, Mark] | None,
        *,
        whole: bool,
    ) -> bool:
        """A big write: the seconds to staging keys in chunks, each chunk one script, then
        one script publishes them with the latest prices and the marks, renaming each
        staging key over its minute key. A refill (``whole``) holds every second of each
        minute it writes; a write of changed seconds alone (a backfill replaying minutes
        faster than the flushes) starts each staging key as a copy of its minute key, so
        the minute's other seconds stay. Either way each script's work is bounded: one of
        3 million changed seconds took longer than the 2 s read timeout, and the cache was
        taken as down."""
        prefix = f"{STAGING_PREFIX}{secrets.token_hex(8)}:"
        staged: dict[str, str] = {}  # minute key -> its staging key, in order
        lost = False
        now = time.monotonic()  # a staging key's TTL runs from its chunk on: noted as now
        fixed = [LATEST_KEY, ALIVE_KEY, MARKS_KEY]
        # Built chunk by chunk (a refill's seconds are read lazily: SecondsSnapshot), so the
        # loop runs between the chunks' round trips.
        pending = iter(seconds)
        while chunk := list(islice(pending, STAGE_CHUNK_SECONDS)):
            keys, prev = list(fixed), ""
            copies: list[str] = []  # (minute key, staging key) pairs, copied first
            minutes: list[list[int]] = []
            prev_ex = prev_sym = ""
            prev_minute = -1
            for b in chunk:
                ex, sym, sec = b[0], b[1], b[2]
                minute = sec - sec % 60
                if minute == prev_minute and sym is prev_sym and ex is prev_ex:
                    minutes[-1][1] += 1
                    continue
                prev_ex, prev_sym, prev_minute = ex, sym, minute
                key = window_key(ex, sym, minute)
                if key == prev:
                    minutes[-1][1] += 1
                    continue
                prev = key
                stage = staged.get(key)
                if stage is None:
                    stage = staged[key] = prefix + key[len(WINDOW_PREFIX) :]
                    if not whole:
                        copies += (key, stage)
                keys.append(stage)
                minutes.append([self._ttl, 1])
            stage_argv = (
                orjson.dumps(([], minutes, [])),
                b"[]",
                orjson.dumps([b[2:] for b in chunk]),
                "-1",
                str(len(copies) // 2),
            )
            _, reloaded = await self._run([*keys, *copies], stage_argv)
            lost = lost or reloaded
        pairs = [k for real, stage in staged.items() for k in (stage, real)]
        argv = (
            orjson.dumps((_fields(latest), [], _flat_marks(marks))),
            orjson.dumps([p[2:] for p in latest]),
            b"[]",
            str(len(staged)),
        )
        missing, reloaded = await self._run([*fixed, *pairs], argv)
        if missing == 2:
            # Redis lost staging keys meanwhile (restarted, or the refill outlived them):
            # nothing was published; the daemon takes Redis as down and refills again.
            raise CacheUnavailable("redis: staged refill lost its staging keys")
        lost = lost or reloaded or missing == 1
        self._note_expiries(list(staged), now, lost)
        return lost

    def _note_expiries(self, fresh: list[str], now: float, lost: bool) -> None:
        expired_at = self._expired_at
        if lost:  # an emptied Redis: every key but those just given one needs its TTL again
            expired_at.clear()
        expired_at.update(dict.fromkeys(fresh, now))
        if now >= self._next_prune:
            self._next_prune = now + self._ttl / 4
            for key in [k for k, t in expired_at.items() if t < now - self._ttl]:
                del expired_at[key]

    async def load_marks(self) -> dict[str, Mark]:
        """Every source's mark as last written."""
        self._check_open()
        try:
            raw = cast(dict[str, str], await self._client.hgetall(MARKS_KEY))
        except CACHE_ERRORS as exc:
            raise CacheUnavailable(f"redis: {_describe(exc)}") from exc
        marks: dict[str, Mark] = {}
        for source, value in raw.items():
            try:
                pos, made = value.split(",")
                marks[source] = (int(pos), int(made))
            except ValueError:
                self._bad(f"{MARKS_KEY} {source}", value)
        return marks

    async def load(
        self, since_second: int, wanted: Callable[[str, str], bool] | None = None
    ) -> tuple[list[LatestPrice], list[SecondBucket]]:
        """Every latest price and the seconds of every minute from the one holding
        ``since_second`` on: whole minutes, never half of one; only the pairs ``wanted``
        accepts, when given (their keys are the only ones read).

        The minute keys are read and parsed ``LOAD_CHUNK_KEYS`` at a time: 500 pairs x 10
        exchanges hold 3.3 million seconds, and one pipeline of everything held the event
        loop for seconds while its replies were parsed."""
        self._check_open()
        seconds: list[SecondBucket] = []
        try:
            # decode_responses=True: keys and values are str.
            raw_latest = cast(dict[str, str], await self._client.hgetall(LATEST_KEY))
            pairs = [
                (key, exchange, symbol)
                async for key in self._client.scan_iter(match=f"{WINDOW_PREFIX}*", count=SCAN_COUNT)
                if self._minute_of(key) + 60 > since_second
                for exchange, symbol, _ in [key[len(WINDOW_PREFIX) :].rsplit(":", 2)]
                if wanted is None or wanted(exchange, symbol)
            ]
            for start in range(0, len(pairs), LOAD_CHUNK_KEYS):
                part = pairs[start : start + LOAD_CHUNK_KEYS]
                pipe = self._client.pipeline(transaction=False)
                for key, _, _ in part:
                    pipe.hgetall(key)
                hashes: list[dict[str, str]] = await pipe.execute()
                for (_, exchange, symbol), fields in zip(part, hashes, strict=True):
                    for sec, value in fields.items():
                        bucket = self._parse_second(exchange, symbol, sec, value)
                        if bucket is not None:
                            seconds.append(bucket)
        except CACHE_ERRORS as exc:
            raise CacheUnavailable(f"redis: {_describe(exc)}") from exc
        latest = [
            p
            for f, v in raw_latest.items()
            if (p := self._parse_latest(f, v)) is not None
            and (wanted is None or wanted(p.exchange, p.symbol))
        ]
        return latest, seconds

    def _minute_of(self, key: str) -> int:
        try:
            return int(key.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return -1  # not one of ours: skipped

    def _parse_latest(self, field: str, value: str) -> LatestPrice | None:
        exchange, sep, symbol = field.rpartition(":")
        try:
            doc: dict[str, Any] = orjson.loads(value)
            price = float(doc["price"])
            ts = int(doc["timestamp"])
            received = int(doc.get("received", ts))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            doc = {}
        if not sep or not doc:
            self._bad(f"{LATEST_KEY} {field}", value)
            return None
        return LatestPrice(exchange, symbol, price, ts, received)

    def _parse_second(
        self, exchange: str, symbol: str, sec: str, value: str
    ) -> SecondBucket | None:
        try:
            low, high, total, count = value.split(",")
            return SecondBucket(
                exchange, symbol, int(sec), float(low), float(high), float(total), int(count)
            )
        except ValueError:
            self._bad(f"{exchange}:{symbol}:{sec}", value)
            return None

    def _bad(self, where: str, value: str) -> None:
        self.bad_values += 1
        log.warning("cache_value_skipped where=%s value=%r", where, value[:200])

    async def ping(self) -> bool:
        """True when Redis answers PING now."""
        if self._closed:
            return False
        try:
            return bool(await self._client.ping())
        except CACHE_ERRORS:
            return False

    async def aclose(self) -> None:
        """Close the connection pool; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._link.aclose()
        await self._client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheUnavailable("redis: cache is closed")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def open_redis(settings: RedisSettings, retention_s: int) -> RedisPriceCache:
    """Connect, PING and register the latest-price script.

    Raises CacheUnavailable when Redis cannot be reached: the caller falls back or waits.
    """
    password = settings.password.get_secret_value() if settings.password else None
    timeout = settings.connect_timeout_s
    client = aioredis.Redis.from_url(
        settings.url,
        password=password,
        decode_responses=True,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        # One immediate retry reconnects a connection Redis dropped (a restart); more would
        # only delay telling the aggregator that Redis is down.
        retry=Retry(NoBackoff(), 1),
    )
    try:
        await client.ping()
        sha: str = await client.script_load(WRITE_SCRIPT)
    except CACHE_ERRORS as exc:
        await client.aclose()
        raise CacheUnavailable(f"redis: {_describe(exc)}") from exc
    return RedisPriceCache(client, retention_s, sha)
