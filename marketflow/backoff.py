"""One reconnect policy for everything that retries: feeds, stores, the cache, the capture writer.

Capped exponential backoff with "equal jitter": after ``n`` consecutive failures the base delay
is ``min(cap, initial * 2 ** (n - 1))`` and the delay drawn is uniform in ``[base / 2, base]``.
Half of the base is kept so a retry never comes at once, and the random half spreads callers
that failed together (feeds after a venue restart, writers after a database restart) instead
of moving them in step. The random numbers come from an injected ``random.Random``: a seeded
one makes the delays repeatable in tests, and nothing touches the global ``random`` state.

``reconnect_forever`` is the one loop around a connection that must never give up.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import NoReturn

Sleep = Callable[[float], Awaitable[None]]

_MAX_DOUBLINGS = 60  # 2 ** 60 times any initial delay is past every cap: no float overflow


class Backoff:
    """Delays between retries: exponential in consecutive failures, capped, equal jitter."""

    __slots__ = ("_cap", "_initial", "_rng", "failures")

    def __init__(self, initial_s: float, cap_s: float, rng: random.Random) -> None:
        if initial_s < 0 or cap_s < initial_s:
            raise ValueError("need 0 <= initial_s <= cap_s")
        self._initial = initial_s
        self._cap = cap_s
        self._rng = rng
        self.failures = 0  # consecutive failures since the last reset

    def delay(self, failures: int) -> float:
        """The delay before the next attempt after ``failures`` (>= 1) consecutive failures."""
        doublings = min(max(failures, 1) - 1, _MAX_DOUBLINGS)
        base = min(self._cap, self._initial * 2.0**doublings)
        return base / 2 + self._rng.uniform(0.0, base / 2)

    def fail(self) -> float:
        """Count one more failure; the delay before the next attempt."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """An attempt succeeded (or made progress): the next failure waits ``initial`` again."""
        self.failures = 0


async def reconnect_forever(
    connect: Callable[[], Awaitable[None]],
    backoff: Backoff,
    ended: Callable[[Exception | None, float], None],
    *,
    sleep: Sleep = asyncio.sleep,
) -> NoReturn:
    """Run ``connect`` again and again until cancelled.

    ``connect`` is one connection: it returns when the peer closed it and raises when it
    failed; one that made progress (delivered data, logged on) calls ``backoff.reset()`` so a
    restarted peer is reconnected fast. After each, ``ended(error, delay)`` reports how it
    ended (``error`` None for a close by the peer) before waiting ``delay``. Any exception is
    retried (a feed bug must not end the feed); cancellation is not caught.
    """
    while True:
        error: Exception | None = None
        try:
            await connect()
        except Exception as exc:  # noqa: BLE001 - retried and reported through ``ended``
            error = exc
        delay = backoff.fail()
        ended(error, delay)
        await sleep(delay)
