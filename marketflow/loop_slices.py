"""Long work cut into slices of the event loop.

One loop serves feed reads, parsing, flushes and HTTP: a step that runs for 50 ms delays
every one of them by 50 ms. Work over thousands of items (a flush over 5,000 changed
windows, the encoding of its seconds) checks a ``Slices`` every few items and yields to the
loop once a slice is spent, so that sockets and requests are served in between.
"""

from __future__ import annotations

import asyncio
import time

SLICE_S = 0.002  # the longest a sliced step holds the loop between yields
CHECK_EVERY = 32  # items between two looks at the clock (a look costs ~50 ns)


class Slices:
    """A clock for one sliced step: ``spent()`` once ``slice_s`` has run since the step
    started or last yielded, ``pause()`` to yield; ``busy_s`` is the time the step ran, not
    counting the time others ran while it was paused.

    With ``finish_on_cancel`` a pause is no cancellation point: a step cancelled there (the
    daemon stopping) runs to its end without further pauses and finds ``cancelled`` set, so
    that it can leave its state whole (what it took, written or owed) and then raise
    ``CancelledError`` itself. Without, a pause is one like any ``await``."""

    __slots__ = ("_started", "busy_s", "cancelled", "finish_on_cancel", "slice_s", "yields")

    def __init__(self, slice_s: float = SLICE_S, *, finish_on_cancel: bool = False) -> None:
        self.slice_s = slice_s
        self.finish_on_cancel = finish_on_cancel
        self.busy_s = 0.0
        self.yields = 0
        self.cancelled = False
        self._started = time.perf_counter()

    def spent(self) -> bool:
        return not self.cancelled and time.perf_counter() - self._started > self.slice_s

    async def pause(self) -> None:
        """Yield one loop iteration (ready callbacks and a poll of the sockets run)."""
        self.busy_s += time.perf_counter() - self._started
        self.yields += 1
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not self.finish_on_cancel:
                raise
            self.cancelled = True
        self._started = time.perf_counter()

    def done(self) -> float:
        """``busy_s`` up to now (the step's total once it ends)."""
        now = time.perf_counter()
        self.busy_s += now - self._started
        self._started = now
        return self.busy_s
