"""The audit-trail routes' input checks, against a recording fake of the capture service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from marketflow.domain.capture import EnrichedField, MessageQuery, StoredMessage, StoredReject
from marketflow.entrypoints.http_common import new_app
from marketflow.entrypoints.http_messages import add_message_routes, parse_since

HUGE = "9" * 5000  # more digits than int() converts from a str (sys.get_int_max_str_digits)


class RecordingQueries:
    def __init__(self) -> None:
        self.queries: list[MessageQuery] = []
        self.rejects: list[tuple[int, int | None]] = []
        self.ids: list[int] = []

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]:
        self.queries.append(query)
        return []

    async def get_message(self, message_id: int) -> StoredMessage | None:
        self.ids.append(message_id)
        return None

    async def list_rejects(self, limit: int, before_id: int | None = None) -> list[StoredReject]:
        self.rejects.append((limit, before_id))
        return []

    def type_name(self, msg_type: str) -> str | None:
        return None

    def enrich(self, fields: Sequence[tuple[int, str]]) -> list[EnrichedField]:
        return []


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient[Any, Any], RecordingQueries]]:
    service = RecordingQueries()
    app = new_app()
    add_message_routes(app, service)
    async with TestClient(TestServer(app)) as c:
        yield c, service


@pytest.mark.parametrize(
    "path",
    [
        f"/api/messages?limit={HUGE}",
        f"/api/messages?before_id={HUGE}",
        f"/api/messages?offset={HUGE}",
        f"/api/messages?since={HUGE}",
        f"/api/messages/{HUGE}",
        f"/api/messages/rejects?limit={HUGE}",
        f"/api/messages/rejects?before_id={HUGE}",
        "/api/messages?before_id=9223372036854775808",  # one above bigint
        "/api/messages/9223372036854775808",
        "/api/messages?limit=1&limit=2",
        "/api/messages/rejects?before_id=5&before_id=6",
        "/api/messages?limit=%D9%A1",  # an Arabic-Indic digit: isdigit() but not ASCII
        "/api/messages?limit=+5",
        "/api/messages?limit=1_0",
    ],
)
async def test_bad_numbers_answer_400_with_a_json_error(
    client: tuple[TestClient[Any, Any], RecordingQueries], path: str
) -> None:
    c, service = client

    resp = await c.get(path)

    assert resp.status == 400
    body = await resp.json()
    assert set(body) == {"error"}
    assert len(body["error"]) < 200  # the input is not echoed back whole
    assert (service.queries, service.rejects, service.ids) == ([], [], [])


async def test_largest_values_and_leading_zeros_are_accepted(
    client: tuple[TestClient[Any, Any], RecordingQueries],
) -> None:
    c, service = client
    big = 2**63 - 1

    ok = [
        await c.get(f"/api/messages?limit=1000&before_id={big}&offset=0100000"),
        await c.get("/api/messages/rejects?limit=0001&before_id=" + "0" * 5000 + "7"),
        await c.get(f"/api/messages/{big}"),
    ]

    assert [r.status for r in ok] == [200, 200, 404]
    assert service.queries == [MessageQuery(limit=1000, before_id=big, offset=100_000)]
    assert service.rejects == [(1, 7)]
    assert service.ids == [big]


def test_since_with_thousands_of_digits_is_out_of_range_not_a_crash() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_since(HUGE)
    assert parse_since("0" * 5000 + "1700000000000") == 1_700_000_000_000


class OneOfEach(RecordingQueries):
    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]:
        return [StoredMessage(1, 1_700_000_000_123, "p", "8=FIX.4.4|", "FIX.4.4", "0", "A", "B",
                              1, None, [(8, "FIX.4.4")])]  # fmt: skip

    async def list_rejects(self, limit: int, before_id: int | None = None) -> list[StoredReject]:
        return [StoredReject(2, 1_700_000_000_456, "p", "bad_checksum", "x")]


async def test_timestamps_are_rfc3339_utc_ending_in_z_as_in_every_route() -> None:
    app = new_app()
    add_message_routes(app, OneOfEach())
    async with TestClient(TestServer(app)) as c:
        messages = await (await c.get("/api/messages")).json()
        rejects = await (await c.get("/api/messages/rejects")).json()

    assert messages["messages"][0]["received_at"] == "2023-11-14T22:13:20.123Z"
    assert rejects["rejects"][0]["received_at"] == "2023-11-14T22:13:20.456Z"


async def test_routes_added_to_any_app_answer_errors_as_json() -> None:
    app = web.Application()  # not made by new_app(): add_message_routes brings the convention
    add_message_routes(app, RecordingQueries())
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/api/messages?limit=0")
        body = await resp.json()

    assert resp.status == 400
    assert set(body) == {"error"}
