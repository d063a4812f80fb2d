"""The OpenAPI document matches the routes, and every route's answers match the document.

schemathesis generates requests from the document for every operation and checks each answer
(no 5xx, a documented status, content type and body schema) against an app built on fakes,
served on loopback from a thread of its own (schemathesis' client is synchronous). A fresh
app per test: a mode switched by one operation's examples leaks into no other test.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from marketflow.adapters.fix.dictionary import FixDictionary
from marketflow.app.stream_hub import StreamHub
from marketflow.domain.capture import EnrichedField, MessageQuery, StoredMessage, StoredReject
from marketflow.domain.diagnostics import PipelineStatsRow
from marketflow.domain.ticks import BookUpdate, TickBatch
from marketflow.entrypoints.http_common import ControlGuard, JsonErrorsRunner
from marketflow.entrypoints.http_diagnostics import add_diagnostics_routes
from marketflow.entrypoints.http_messages import add_message_routes
from marketflow.entrypoints.http_stream import add_stream_routes
from marketflow.entrypoints.openapi import document, documented_operations, routed_operations
from marketflow.settings import DEFAULT_PAIRS, StreamSettings
from tests.unit.test_http_api import T0, build_test_app

RAW = "8=FIX.4.4|9=5|35=0|10=000|"


class Messages:
    """A capture service with one message and one reject."""

    message = StoredMessage(7, T0, "127.0.0.1:5000", RAW, "FIX.4.4", "0", "VENUE", "MF", 3,
                            None, [(8, "FIX.4.4"), (35, "0")])  # fmt: skip
    reject = StoredReject(2, T0 + 1, "127.0.0.1:5001", "bad_checksum", "garbage")

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]:
        return [self.message][: query.limit]

    async def get_message(self, message_id: int) -> StoredMessage | None:
        return self.message if message_id == self.message.id else None

    async def list_rejects(self, limit: int, before_id: int | None = None) -> list[StoredReject]:
        return [self.reject][:limit]

    def type_name(self, msg_type: str) -> str | None:
        return FixDictionary().meaning(35, msg_type)

    def enrich(self, fields: Sequence[tuple[int, str]]) -> list[EnrichedField]:
        return FixDictionary().enrich(fields)


class Stats:
    """A pipeline_stats store with one row."""

    kind = "fake"
    row = PipelineStatsRow("node-a", "all", T0 // 60_000 * 60_000, 10, 9, 1, {"bad_json": 1},
                           {}, {"fanin": 0}, 2, 1.5, 3.0, T0)  # fmt: skip

    async def write_stats(self, rows: Sequence[PipelineStatsRow]) -> None:
        raise AssertionError("the API only reads")

    async def read_stats(
        self, node: str | None, since_ms: int | None, limit: int
    ) -> list[PipelineStatsRow]:
        return [self.row][:limit]


def full_app() -> web.Application:
    """Every route of the daemon (capture on), on fakes, with some prices folded."""
    parts = build_test_app(ControlGuard(None))
    for ex in parts.modes.known_exchanges():
        ticks = {p: [(100.0 + i, T0 + 1000 * i) for i in range(3)] for p in DEFAULT_PAIRS}
        parts.agg.fold(TickBatch(ex, ticks, T0, 3 * len(DEFAULT_PAIRS)))
    # the world view: two venues quote BTCUSDT (one with depth), so /bbo and /book answer 200
    books = [BookUpdate("exchange1", "BTCUSDT", 100.0, 101.0, T0, 1.0, 2.0,
                        ((100.0, 1.0), (99.0, 3.0)), ((101.0, 2.0),)),
             BookUpdate("exchange2", "BTCUSDT", 100.5, None, T0)]  # fmt: skip
    parts.agg.fold(TickBatch("exchange1", {}, T0, 0, books=books))
    add_message_routes(parts.app, Messages())
    add_diagnostics_routes(parts.app, Stats())
    add_stream_routes(parts.app, StreamHub(StreamSettings(), DEFAULT_PAIRS, parts.clock),
                      StreamSettings())  # fmt: skip

    async def start_mode(app: web.Application) -> None:
        await parts.modes.switch("live")

    async def stop_mode(app: web.Application) -> None:
        await parts.modes.stop()

    parts.app.on_startup.append(start_mode)
    parts.app.on_cleanup.append(stop_mode)
    return parts.app


class ServedApp:
    """``full_app()`` on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = JsonErrorsRunner(full_app(), access_log=None, handle_signals=False)
        try:
            await runner.setup()
            await web.SockSite(runner, self._sock).start()
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the API did not start"
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def served() -> Iterator[ServedApp]:
    app = ServedApp()
    app.start()
    try:
        yield app
    finally:
        app.stop()


def test_every_route_is_documented_and_every_documented_path_routed() -> None:
    routed = routed_operations(full_app())
    documented = documented_operations(document())

    assert sorted(routed - documented) == [], "routes missing from openapi.py"
    assert sorted(documented - routed) == [], "documented paths with no route"


def test_served_document_is_the_document_of_the_routes_the_app_has(served: ServedApp) -> None:
    resp = requests.get(f"{served.base_url}/openapi.json", timeout=5)

    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert orjson.loads(resp.content) == orjson.loads(orjson.dumps(document()))


# The streaming routes answer with endless streams (a WebSocket, an event stream) that a
# request/response checker cannot read to the end; tests/unit/test_http_stream.py checks them.
SCHEMA = schemathesis.openapi.from_dict(document()).exclude(path_regex="^/stream")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@SCHEMA.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_route_answers_as_documented(case: Any, served: ServedApp) -> None:
    case.call_and_validate(base_url=served.base_url, checks=CHECKS, timeout=10)
