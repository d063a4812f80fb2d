"""``async with`` for everything closed by ``aclose()``, and the core tasks of a node: one
piece of code each, not one per adapter or role."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Self

log = logging.getLogger("marketflow")


class Closing:
    """A mixin without state: ``async with x:`` yields ``x`` and closes it with ``aclose()``
    on the way out (``aclose`` is the subclass's, and safe to call twice)."""

    __slots__ = ()

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class CoreTasks:
    """The long-running tasks of a node: any that fails (a bug) is logged and sets ``died``,
    so the node stops instead of running on without it (the daemon and the ingest role)."""

    def __init__(self, died: asyncio.Event) -> None:
        self.died = died
        self.tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self.watch(task)
        self.tasks.append(task)

    def watch(self, task: asyncio.Task[Any]) -> None:
        """Stop the node when ``task`` (made elsewhere) fails."""
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.error("task_died task=%s error=%r", task.get_name(), exc, exc_info=exc)
        self.died.set()

    async def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
