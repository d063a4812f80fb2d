"""The FIX capture listener end to end over real PostgreSQL and SQLite, read back over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from marketflow.adapters.capture.decoder import FixCaptureDecoder
from marketflow.adapters.capture.listener import CaptureListener
from marketflow.adapters.capture.postgres_store import PostgresCaptureStore
from marketflow.adapters.capture.sqlite_store import SqliteCaptureStore
from marketflow.adapters.fix.codec import encode
from marketflow.adapters.fix.dictionary import FixDictionary
from marketflow.app.capture import CaptureService
from marketflow.domain.capture import CaptureStore
from marketflow.entrypoints.http_messages import add_message_routes
from marketflow.settings import CaptureSettings, PostgresSettings

pytestmark = pytest.mark.integration


def order(seq: int, symbol: str = "AAPL", sender: str = "CLIENT", msg_type: str = "D") -> bytes:
    return encode(
        msg_type,
        [(11, f"ORD{seq}"), (55, symbol), (54, 1), (38, 100), (40, 2), (44, "187.25")],
        begin="FIX.4.2",
        sender=sender,
        target="MARKETFLOW",
        seq=seq,
        sending_time="20261126-11:45:30.123",
    )


class Capture:
    def __init__(
        self,
        store: CaptureStore,
        client: TestClient[Any, Any],
        listener: CaptureListener,
        service: CaptureService,
    ) -> None:
        self.store = store
        self.client = client
        self.listener = listener
        self.service = service

    async def send(self, *chunks: bytes, pause_s: float = 0.0) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", self.listener.port)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        writer.close()
        await writer.wait_closed()

    async def wait_stored(self, messages: int, rejects: int = 0) -> None:
        async with asyncio.timeout(5.0):
            # Polling is the point: the rows must be visible in the database itself.
            while await self.store.count() < (messages, rejects):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert await self.store.count() == (messages, rejects)

    async def get(self, path: str, status: int = 200) -> Any:
        resp = await self.client.get(path)
        assert resp.status == status, await resp.text()
        return await resp.json()


@pytest.fixture(params=["postgres", "sqlite"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """A fresh PostgreSQL database (its dsn) or a fresh SQLite file (its path)."""
    if request.param == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        return dsn
    return tmp_path / "capture.sqlite"


@contextlib.asynccontextmanager
async def open_capture(store_target: str | Path, **settings: Any) -> AsyncIterator[Capture]:
    store: CaptureStore
    if isinstance(store_target, str):
        store = await PostgresCaptureStore.open(PostgresSettings(dsn=store_target))
    else:
        store = await SqliteCaptureStore.open(store_target)
    config = CaptureSettings(**{"port": 0, "batch_max": 500, "flush_interval_ms": 10, **settings})
    service = CaptureService(store, config, FixCaptureDecoder(), FixDictionary())
    app = web.Application()
    add_message_routes(app, service)
    async with (
        store,
        service,
        CaptureListener(service, config) as listener,
        TestClient(TestServer(app)) as client,
    ):
        yield Capture(store, client, listener, service)


@pytest.fixture
async def capture(store_target: str | Path) -> AsyncIterator[Capture]:
    async with open_capture(store_target) as c:
        yield c


async def until(check: Callable[[], bool], within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not check():  # noqa: ASYNC110  # polling a counter with a deadline
            await asyncio.sleep(0.01)


async def closed_by_peer(reader: asyncio.StreamReader, within_s: float = 5.0) -> bool:
    async with asyncio.timeout(within_s):
        return await reader.read(1) == b""


async def test_message_written_to_socket_shows_in_api(capture: Capture) -> None:
    await capture.send(order(1))

    async with asyncio.timeout(10.0):  # flushed every 10 ms; generous for a loaded machine
        while not (body := await capture.get("/api/messages"))["messages"]:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    [msg] = body["messages"]
    assert (msg["msg_type"], msg["msg_type_name"], msg["symbol"]) == ("D", "NewOrderSingle", "AAPL")
    assert msg["peer"].startswith("127.0.0.1:")
    detail = await capture.get(f"/api/messages/{msg['id']}")
    assert detail["raw"] == order(1).decode().replace("\x01", "|")
    assert {"tag": 54, "name": "Side", "value": "1", "meaning": "Buy"} in detail["enriched"]
    assert [55, "AAPL"] in detail["parsed"]


async def test_values_that_need_escaping_read_back_exactly(capture: Capture) -> None:
    """Each store escapes what its format needs (COPY text, JSON): raw, parsed and enriched
    forms read back exactly, next to plain messages of the same batch."""
    odd = [b'A"B', b"A\\B", b"A\tB", b"A\nB\rC", b"A\x00B", "Société".encode(), b"\xff\xfe",
           b"\\N", b"A\x7f\x02B"]  # fmt: skip
    frames = [order(1)]
    for i, value in enumerate(odd, start=2):
        frames.append(
            encode("D", [(11, value), (55, value), (54, 2)], begin="FIX.4.4", sender="C\tX",
                   target="T", seq=i, sending_time="20261126-11:45:30.123")
        )  # fmt: skip
    await capture.send(b"".join(frames))

    await capture.wait_stored(len(frames))
    listed = (await capture.get("/api/messages?limit=100"))["messages"]
    assert [m["seq_num"] for m in listed] == list(range(len(frames), 0, -1))
    for summary in listed:
        detail = await capture.get(f"/api/messages/{summary['id']}")
        i = summary["seq_num"]
        frame = frames[i - 1]
        assert base64.b64decode(detail["raw_base64"]) == frame
        if i == 1:
            continue  # the plain order: test_message_written_to_socket_shows_in_api
        text = as_stored(odd[i - 2])
        length, checksum = frame_values(frame)
        pairs = [[8, "FIX.4.4"], [9, length], [35, "D"], [49, "C\tX"], [56, "T"], [34, str(i)],
                 [52, "20261126-11:45:30.123"], [11, text], [55, text], [54, "2"],
                 [10, checksum]]  # fmt: skip
        assert detail["parsed"] == pairs
        assert detail["enriched"] == [
            {"tag": tag, "name": name, "value": value} | ({"meaning": meaning} if meaning else {})
            for (tag, value), (name, meaning) in zip(pairs, NAMES, strict=True)
        ]
        assert (detail["symbol"], detail["sender"]) == (text, "C\tX")
        assert detail["msg_type_name"] == "NewOrderSingle"
    assert {m["symbol"] for m in listed} == {"AAPL", *(as_stored(v) for v in odd)}


# FIX 4.4 names of the fields above, and the meanings of 35=D and 54=2.
NAMES = [("BeginString", None), ("BodyLength", None), ("MsgType", "NewOrderSingle"),
         ("SenderCompID", None), ("TargetCompID", None), ("MsgSeqNum", None),
         ("SendingTime", None), ("ClOrdID", None), ("Symbol", None), ("Side", "Sell"),
         ("CheckSum", None)]  # fmt: skip


def as_stored(value: bytes) -> str:
    """Text as the audit trail keeps it: UTF-8 (U+FFFD for bad bytes), NUL written as \\x00."""
    return value.decode("utf-8", "replace").replace("\x00", "\\x00")


def frame_values(frame: bytes) -> tuple[str, str]:
    """BodyLength and CheckSum of ``frame``, counted here (FIX: bytes after 9=...<SOH> up to
    10=, and their sum mod 256), and checked against what the frame carries."""
    body_start = frame.index(b"\x01", frame.index(b"\x019=") + 1) + 1
    tail = frame.rindex(b"10=")
    length, checksum = str(tail - body_start), f"{sum(frame[:tail]) % 256:03d}"
    assert frame.endswith(b"\x0110=" + checksum.encode() + b"\x01")
    assert b"\x019=" + length.encode() + b"\x01" in frame
    return length, checksum


async def test_a_row_the_store_refuses_costs_only_itself(capture: Capture) -> None:
    huge_seq = encode("D", [(55, "AAPL")], sender="C", target="T", seq=10**20, sending_time="x")
    await capture.send(order(1) + huge_seq + order(2))

    await capture.wait_stored(2, 1)
    [reject] = (await capture.get("/api/messages/rejects"))["rejects"]
    assert reject["reason"].startswith("store_refused")
    assert reject["raw"] == huge_seq.decode().replace("\x01", "|")
    assert capture.service.stats()["stored"] == 2


async def test_many_messages_in_one_packet_and_one_split_over_many(capture: Capture) -> None:
    await capture.send(b"".join(order(i) for i in range(1, 51)))
    one = order(51)
    await capture.send(*[one[i : i + 7] for i in range(0, len(one), 7)], pause_s=0.002)

    await capture.wait_stored(51)
    body = await capture.get("/api/messages?limit=1000")
    seqs = [m["seq_num"] for m in body["messages"]]
    assert seqs == list(range(51, 0, -1))  # newest first


async def test_garbage_between_messages_and_bad_checksum_land_in_rejects(capture: Capture) -> None:
    bad = order(3)[:-4] + b"000\x01"
    await capture.send(
        order(1) + b"\x00\xffgarbage!!" + order(2) + bad + order(4) + b"8=FIX.4.2\x019=5"
    )

    await capture.wait_stored(3, 3)
    rejects = (await capture.get("/api/messages/rejects"))["rejects"]
    reasons = sorted(r["reason"] for r in rejects)
    assert reasons == ["bad_checksum", "garbage", "truncated_at_disconnect"]
    stats = capture.service.stats()
    assert stats["rejected"] == {"bad_checksum": 1, "garbage": 1, "truncated_at_disconnect": 1}
    garbage = next(r for r in rejects if r["reason"] == "garbage")
    assert garbage["raw"] == "\\x00\\xffgarbage!!"  # lossless escape of NUL and a non-UTF-8 byte


async def test_twenty_concurrent_clients_then_filters_and_paging(capture: Capture) -> None:
    async def client(n: int) -> None:
        symbol = "MSFT" if n % 2 else "AAPL"
        data = b"".join(order(i, symbol, f"C{n}") for i in range(1, 26))
        await capture.send(data[:1000], data[1000:])

    await asyncio.gather(*(client(n) for n in range(20)))
    await capture.wait_stored(500)

    msft = await capture.get("/api/messages?symbol=MSFT&msg_type=D&limit=1000")
    assert len(msft["messages"]) == 250
    assert {m["symbol"] for m in msft["messages"]} == {"MSFT"}
    first = await capture.get("/api/messages?limit=200")
    second = await capture.get(f"/api/messages?limit=200&before_id={first['next_before_id']}")
    ids = [m["id"] for m in first["messages"] + second["messages"]]
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == 400
    assert (await capture.get("/api/messages?since=2999-01-01T00:00:00Z"))["messages"] == []
    assert len((await capture.get("/api/messages?since=0&limit=1000"))["messages"]) == 500


async def test_bad_input_is_400_and_unknown_id_is_404(capture: Capture) -> None:
    bad = ["limit=0", "limit=1001", "limit=x", "before_id=-1", "since=yesterday", "nope=1",
           "since=2026-01-01T00:00:00", "before_id=99999999999999999999"]  # fmt: skip
    for query in bad:
        body = await capture.get(f"/api/messages?{query}", 400)
        assert "error" in body
    assert "error" in await capture.get("/api/messages/abc", 400)
    assert "error" in await capture.get("/api/messages/99999999999999999999", 400)
    assert "error" in await capture.get("/api/messages/12345", 404)


async def test_garbage_peer_cannot_break_the_listener(capture: Capture) -> None:
    noise = bytes(range(256)) * 400 + b"8=FIX.4.2\x019=99999999\x01" + b"8=FIX" * 1000

    await capture.send(noise)
    await capture.send(order(1))

    await capture.wait_stored(1, await _rejects(capture))
    assert capture.service.stats()["accepted"] == 1
    assert capture.listener.stats()["connections_total"] == 2


async def _rejects(capture: Capture) -> int:
    async with asyncio.timeout(5.0):
        # The noise ends as some rejects; wait until the service has stored all it counted.
        while (stats := capture.service.stats())["stored"] < 1 or stats["pending"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return int(stats["rejected_total"])


async def test_connections_above_the_cap_are_refused_and_counted(tmp_path: Path) -> None:
    async with open_capture(tmp_path / "c.sqlite", max_connections=2) as capture:
        port = capture.listener.port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await until(lambda: capture.listener.stats()["connections_open"] == 2)

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_peer(reader)
        writer.close()
        held[0][1].write(order(1))  # the connections within the cap still work
        await capture.wait_stored(1)
        held[1][1].close()
        await until(lambda: capture.listener.stats()["connections_open"] == 1)
        await capture.send(order(2))  # a freed place is taken again
        await capture.wait_stored(2)
        held[0][1].close()

        stats = capture.listener.stats()
        assert (stats["connections_refused"], stats["connections_total"]) == (1, 3)  # accepted


async def test_idle_peer_is_closed_and_its_partial_message_kept_as_a_reject(
    tmp_path: Path,
) -> None:
    async with open_capture(tmp_path / "c.sqlite", idle_timeout_s=0.2) as capture:
        reader, writer = await asyncio.open_connection("127.0.0.1", capture.listener.port)
        writer.write(order(1) + order(2)[:20])

        assert await closed_by_peer(reader)
        writer.close()
        await capture.wait_stored(1, 1)
        [reject] = (await capture.get("/api/messages/rejects"))["rejects"]
        assert reject["reason"] == "truncated_at_disconnect"
        assert reject["raw"] == order(2)[:20].decode().replace("\x01", "|")
        assert capture.listener.stats()["idle_closed"] == 1


async def test_message_above_the_size_limit_is_refused_and_counted(tmp_path: Path) -> None:
    async with open_capture(tmp_path / "c.sqlite", max_message_bytes=512) as capture:
        big = encode("D", [(55, "AAPL"), (58, "x" * 600)], sender="C", target="T", seq=1,
                     sending_time="20261126-11:45:30.123")  # fmt: skip

        await capture.send(big + order(1))

        await capture.wait_stored(1, 1)
        [reject] = (await capture.get("/api/messages/rejects"))["rejects"]
        assert reject["reason"] == "message_too_large"
        assert capture.listener.stats()["messages_too_large"] == 1


async def test_message_trickled_byte_by_byte_is_stored(tmp_path: Path) -> None:
    async with open_capture(tmp_path / "c.sqlite") as capture:
        one = order(1)
        _, writer = await asyncio.open_connection("127.0.0.1", capture.listener.port)
        for i in range(len(one)):
            writer.write(one[i : i + 1])
            await writer.drain()
        writer.close()

        await capture.wait_stored(1)
