"""The test's own aggregation of exactly what the scripted exchanges sent, and the checks of
minute rows and API answers against it.

A tick is *must* (the daemon has to have it) unless it was sent less than ``D`` before the end
of the connection it went out on (a SIGKILL, or the exchange seeing the link die), or it sat in
a minute still open (or closed less than D before) when the daemon was killed together with an
emptied Redis ("the open minute may lose what only Redis held"), or the exchange marked it
optional. Every other tick is *optional*: it may be counted once, or not at all, never twice.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg

from tests.e2e.scripted import Conn, Tick

D_S = 1.0  # the loss bound this suite holds the daemon to
GRACE_MS = 2000
REL = 1e-9
Key = tuple[str, str, int]  # exchange, pair, minute start (epoch ms)


@dataclass(frozen=True, slots=True)
class Kill:
    at: float  # wall time (s) of the SIGKILL
    ex_ms: int  # exchange time then
    redis_wiped: bool


@dataclass(frozen=True, slots=True)
class Row:
    count: int
    low: float
    high: float
    avg: float
    covered_ms: int | None


@dataclass
class Minute:
    sent: list[float] = field(default_factory=list)
    must: list[float] = field(default_factory=list)
    optional: list[float] = field(default_factory=list)

    def add(self, price: float, must: bool) -> None:
        self.sent.append(price)
        (self.must if must else self.optional).append(price)

    @property
    def exact(self) -> bool:
        return not self.optional


def _lossy(minute_ms: int, kill: Kill) -> bool:
    clock = max(kill.at * 1000, kill.ex_ms)
    return minute_ms + 60_000 + GRACE_MS > clock - D_S * 1000


def classify(
    ticks: Iterable[Tick], conns: dict[str, list[Conn]], kills: Sequence[Kill]
) -> dict[Key, Minute]:
    """Per minute: every price sent, split into must and optional."""
    out: dict[Key, Minute] = defaultdict(Minute)
    for t in ticks:
        m = out[(t.exchange, t.symbol, t.ts // 60_000 * 60_000)]
        m.add(t.price, is_must(t, conns, kills))
    return dict(out)


def is_must(t: Tick, conns: dict[str, list[Conn]], kills: Sequence[Kill]) -> bool:
    """True when the daemon has no excuse for not counting ``t``."""
    if t.optional:
        return False
    conn = conns[t.exchange][t.conn]
    ends = [k.at for k in kills if k.at > conn.accepted_at]
    if conn.ended_at is not None:
        ends.append(conn.ended_at)
    end = min(ends, default=None)
    if end is not None and t.sent_at > end - D_S:
        return False
    minute = t.ts // 60_000 * 60_000
    return not any(k.redis_wiped and t.sent_at < k.at and _lossy(minute, k) for k in kills)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b))


@dataclass(frozen=True, slots=True)
class Known:
    """A part of an answer known exactly (stored rows): count, sum, low, high."""

    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf


def check_subset(
    what: str,
    m: Minute,
    count: int,
    low: float,
    high: float,
    avg: float,
    known: Known | None = None,
) -> list[str]:
    """``count/low/high/avg`` must describe ``known`` plus all of ``m.must`` plus some of
    ``m.optional`` (each at most once); exactly ``known`` + ``m.sent`` when nothing is
    optional."""
    k0 = known or Known()
    n = len(m.sent)
    if m.exact:
        exp_n = k0.count + n
        exp_lo, exp_hi = min([k0.low, *m.sent]), max([k0.high, *m.sent])
        exp = (k0.total + math.fsum(m.sent)) / exp_n if exp_n else math.nan
        if count != exp_n or low != exp_lo or high != exp_hi or not _close(avg, exp):
            return [
                f"{what}: expected exactly count={exp_n} low={exp_lo!r} high={exp_hi!r} "
                f"avg={exp!r}, got count={count} low={low!r} high={high!r} avg={avg!r}"
            ]
        return []
    errs = []
    lo_n, hi_n = k0.count + len(m.must), k0.count + n
    if not lo_n <= count <= hi_n:
        errs.append(
            f"{what}: count={count} outside [{lo_n} must, {hi_n} sent] "
            f"({'lost ticks' if count < lo_n else 'more than sent or stored: counted twice?'})"
        )
    if count and (low < min([k0.low, *m.sent]) or high > max([k0.high, *m.sent])):
        errs.append(f"{what}: low/high {low!r}/{high!r} outside what was sent")
    if low > min([k0.low, *m.must]) or high < max([k0.high, *m.must]):
        errs.append(f"{what}: count={count} low/high {low!r}/{high!r} miss a must tick")
    if not errs and count:
        k = count - lo_n
        rest = sorted(m.optional)
        base = k0.total + math.fsum(m.must)
        lo_sum = base + math.fsum(rest[:k])
        hi_sum = base + math.fsum(rest[len(rest) - k :]) if k else base
        total = avg * count
        tol = REL * max(abs(hi_sum), 1e-300)
        if not lo_sum - tol <= total <= hi_sum + tol:
            errs.append(f"{what}: sum {total!r} not that of any subset [{lo_sum!r}, {hi_sum!r}]")
    return errs


def merged(minutes: Iterable[Minute]) -> Minute:
    out = Minute()
    for m in minutes:
        out.sent += m.sent
        out.must += m.must
        out.optional += m.optional
    return out


# -- the table --------------------------------------------------------------------------------


_ROWS = (
    "SELECT exchange, pair_name, (extract(epoch FROM timestamp) * 1000)::bigint AS m, "
    "tick_count, min_price, max_price, average_price, NULL::integer AS cov FROM minute_prices"
)
_ROWS_COVERED = _ROWS.replace("NULL::integer AS cov", "covered_ms AS cov")


async def _read_rows(dsn: str) -> dict[Key, Row]:
    conn = await asyncpg.connect(dsn)
    try:
        has_cov = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'minute_prices' AND column_name = 'covered_ms'"
        )
        recs = await conn.fetch(_ROWS_COVERED if has_cov else _ROWS)
    finally:
        await conn.close()
    out: dict[Key, Row] = {}
    for r in recs:
        key = (r["exchange"], r["pair_name"], r["m"])
        assert key not in out, f"two rows for {key}"
        out[key] = Row(
            r["tick_count"], r["min_price"], r["max_price"], r["average_price"], r["cov"]
        )
    return out


def read_rows(dsn: str) -> dict[Key, Row]:
    """Every minute row, keyed by (exchange, pair, minute start ms); asserts one per key."""
    return asyncio.run(_read_rows(dsn))


def shrinks(samples: Sequence[tuple[str, dict[Key, Row]]]) -> list[str]:
    """Rows that vanished or lost ticks between consecutive samples."""
    errs = []
    for (la, a), (lb, b) in itertools.pairwise(samples):
        for key, ra in a.items():
            rb = b.get(key)
            if rb is None or rb.count < ra.count:
                got = "gone" if rb is None else rb.count
                errs.append(f"row {key} shrank from {ra.count} ({la}) to {got} ({lb})")
    return errs


def check_rows(
    rows: dict[Key, Row], minutes: dict[Key, Minute], closed_before_ms: int
) -> list[str]:
    """Closed minutes (ending + grace before ``closed_before_ms``) against the oracle."""
    errs = []
    for key in sorted(set(rows) | set(minutes)):
        r, m = rows.get(key), minutes.get(key)
        closed = key[2] + 60_000 + GRACE_MS < closed_before_ms
        if key[2] % 60_000:
            errs.append(f"row {key}: not at a minute start")
        if m is None:
            errs.append(f"row {key}: no tick was sent in that minute ({r})")
            continue
        if r is None:
            if closed and m.must:
                errs.append(f"row {key} missing: {len(m.must)} must of {len(m.sent)} sent")
            continue
        if r.covered_ms is not None and not 0 <= r.covered_ms <= 60_000:
            errs.append(f"row {key}: covered_ms={r.covered_ms} outside 0-60000")
        if closed:
            errs += check_subset(f"row {key}", m, r.count, r.low, r.high, r.avg)
        elif r.count > len(m.sent):
            errs.append(f"open row {key}: count {r.count} > {len(m.sent)} sent")
    return errs


def expected_all_history(
    rows: dict[Key, Row], minutes: dict[Key, Minute], exchange: str, symbol: str, now_ms: int
) -> tuple[Known, Minute]:
    """What the all-history answer must hold: the closed minutes as stored (exactly), plus
    the open minutes as sent (their must ticks, maybe some optional ones)."""
    counts: list[int] = []
    sums: list[float] = []
    lows: list[float] = []
    highs: list[float] = []
    open_minutes: list[Minute] = []
    for key in set(rows) | set(minutes):
        if key[:2] != (exchange, symbol):
            continue
        if key[2] + 60_000 + GRACE_MS < now_ms:
            r = rows.get(key)
            if r is not None:
                counts.append(r.count)
                sums.append(r.avg * r.count)
                lows.append(r.low)
                highs.append(r.high)
        elif key in minutes:
            open_minutes.append(minutes[key])
    known = Known(
        sum(counts), math.fsum(sums), min(lows, default=math.inf), max(highs, default=-math.inf)
    )
    return known, merged(open_minutes)
