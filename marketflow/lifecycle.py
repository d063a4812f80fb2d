"""``async with`` for everything closed by ``aclose()``: one piece of code, not one per adapter."""

from __future__ import annotations

from typing import Self


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
