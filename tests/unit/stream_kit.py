"""Fakes for the stream hub's tests: a world view and a client sink."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from marketflow.app.stream_hub import Bundle, Frame

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


class FakeView:
    """A world view whose BBO per symbol is a price and a seq that grows with each change."""

    def __init__(self, symbols: list[str], pad: int = 0) -> None:
        self._symbols = list(symbols)
        self.seq = dict.fromkeys(symbols, 0)
        self.price = dict.fromkeys(symbols, 100.0)
        self.pad = "x" * pad  # makes payloads big (slow-client tests)
        self.listeners: list[Callable[[str], None]] = []
        self.status_listeners: list[Callable[[str, str], None]] = []

    def symbols(self) -> list[str]:
        return list(self._symbols)

    def bbo(self, symbol: str) -> dict[str, object] | None:
        if not self.seq.get(symbol):
            return None
        doc: dict[str, object] = {"symbol": symbol, "seq": self.seq[symbol],
                                  "bid": {"price": self.price[symbol]}}  # fmt: skip
        if self.pad:
            doc["pad"] = self.pad
        return doc

    def book(self, symbol: str, depth: int) -> dict[str, object] | None:
        if not self.seq.get(symbol):
            return None
        return {"symbol": symbol, "seq": self.seq[symbol], "depth": depth,
                "bids": [{"price": self.price[symbol]}], "asks": []}  # fmt: skip

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self.listeners.append(listener)

    def subscribe_status(self, listener: Callable[[str, str], None]) -> None:
        self.status_listeners.append(listener)

    def change(self, symbol: str, price: float | None = None) -> None:
        self.seq[symbol] += 1
        self.price[symbol] = price if price is not None else self.price[symbol] + 1
        for listener in self.listeners:
            listener(symbol)


class FakeSink:
    """Records frames; ``held`` plays the bytes its transport still holds (a stuck client)."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.writes = 0  # calls that wrote: one per frame through try_send, one per bundle
        self.held = 0
        self.closed_with: tuple[int, str] | None = None

    async def send(self, frame: Frame) -> None:
        self.frames.append(frame)

    def try_send(self, frame: Frame) -> bool:
        if self.held:
            return False
        self.frames.append(frame)
        self.writes += 1
        return True

    def try_send_bundle(self, bundle: Bundle) -> bool:
        if self.held:
            return False
        self.frames.extend(bundle.frames)
        self.writes += 1
        return True

    def buffered(self) -> int:
        return self.held

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    def docs(self) -> list[dict[str, object]]:
        return [orjson.loads(f.body) for f in self.frames]

    def kinds(self) -> list[tuple[str, str]]:
        return [(f.kind, f.channel) for f in self.frames]


async def until(check: Callable[[], bool], within_s: float = 5.0) -> None:
    """Let the loop run (sender tasks) until ``check()`` holds; fail past the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0)
