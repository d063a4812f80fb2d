"""The capture use case through a fake store: validation, filters, enrichment, batching."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketflow.adapters.capture.decoder import FixCaptureDecoder, _reference
from marketflow.adapters.fix.codec import encode
from marketflow.adapters.fix.dictionary import TAG_ENUMS, TAG_NAMES, enrich, meaning
from marketflow.app.capture import CaptureService
from marketflow.domain.capture import (
    CapturedMessage,
    CaptureReject,
    InvalidMessage,
    MessageQuery,
    StoredMessage,
    StoredReject,
    raw_from_text,
    raw_to_text,
    stored_fields,
)
from marketflow.domain.errors import StoreUnavailable
from marketflow.settings import CaptureFilter, CaptureSettings

PEER = "127.0.0.1:5555"


class FakeCaptureStore:
    kind = "fake"

    def __init__(self) -> None:
        self.messages: list[CapturedMessage] = []
        self.rejects: list[CaptureReject] = []
        self.writes: list[int] = []
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.written = asyncio.Event()

    async def write(
        self, messages: Sequence[CapturedMessage], rejects: Sequence[CaptureReject]
    ) -> list[CaptureReject]:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailable("fake store is down")
        self.writes.append(len(messages) + len(rejects))
        self.messages += messages
        self.rejects += rejects
        self.written.set()
        return []

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]:
        return []

    async def get_message(self, message_id: int) -> StoredMessage | None:
        return None

    async def list_rejects(self, limit: int, before_id: int | None) -> list[StoredReject]:
        return []

    async def count(self) -> tuple[int, int]:
        return len(self.messages), len(self.rejects)

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def order(seq: int = 1, symbol: str = "AAPL", side: str = "1", msg_type: str = "D") -> bytes:
    return encode(
        msg_type,
        [(11, f"ORD{seq}"), (55, symbol), (54, side), (38, 100), (40, 2), (44, "187.25")],
        begin="FIX.4.2",
        sender="CLIENT",
        target="MARKETFLOW",
        seq=seq,
        sending_time="20261126-11:45:30.123",
    )


def service(store: FakeCaptureStore, **settings: object) -> CaptureService:
    options: dict[str, object] = {"batch_max": 1000, "flush_interval_ms": 10_000} | settings
    return CaptureService(
        store,
        CaptureSettings.model_validate(options),
        FixCaptureDecoder(),
        retry_initial_s=0.01,
    )


async def test_valid_order_is_stored_parsed_and_enriched_when_read() -> None:
    store = FakeCaptureStore()
    async with service(store) as svc:
        await svc.submit(PEER, 1000, [order(7)])
        await svc.flush()

    [msg] = store.messages
    assert (msg.msg_type, msg.symbol, msg.seq_num) == ("D", "AAPL", 7)
    assert meaning(35, msg.msg_type) == "NewOrderSingle"
    assert (msg.sender, msg.target, msg.peer, msg.received_ms) == (
        "CLIENT",
        "MARKETFLOW",
        PEER,
        1000,
    )
    pairs = orjson.loads(msg.fields_json)
    assert ["35", "D"] in pairs
    assert ["54", "1"] in pairs
    enriched = enrich(stored_fields(pairs))  # what the API adds when it reads the message
    assert {"tag": 35, "name": "MsgType", "value": "D", "meaning": "NewOrderSingle"} in enriched
    assert {"tag": 54, "name": "Side", "value": "1", "meaning": "Buy"} in enriched
    assert svc.stats()["accepted"] == 1
    assert svc.stats()["stored"] == 1


async def test_invalid_messages_are_stored_as_rejects_with_reason() -> None:
    no_sender = order().replace(b"\x0149=CLIENT", b"")  # framing not rechecked by the service
    bad_seq = order().replace(b"34=1\x01", b"34=x\x01")
    store = FakeCaptureStore()
    async with service(store) as svc:
        await svc.submit(PEER, 1, [no_sender, bad_seq], [("bad_checksum", b"8=FIX.4.2|junk")])
        await svc.flush()
        stats = svc.stats()

    reasons = sorted(r.reason for r in store.rejects)
    assert reasons == ["bad_checksum", "bad_seq_num: 'x'", "missing_header_tags: 49"]
    assert store.messages == []
    assert stats["rejected"] == {"bad_checksum": 1, "bad_seq_num": 1, "missing_header_tags": 1}
    assert stats["stored_rejects"] == 3


async def test_include_filter_keeps_only_matching_and_counts_the_rest() -> None:
    store = FakeCaptureStore()
    rule = CaptureFilter(tag=55, values=("AAPL", "MSFT"))
    async with service(store, filters=(rule,)) as svc:
        await svc.submit(PEER, 1, [order(1, "AAPL"), order(2, "TSLA"), order(3, "MSFT")])
        await svc.flush()
        stats = svc.stats()

    assert [m.symbol for m in store.messages] == ["AAPL", "MSFT"]
    assert stats["filtered"] == 1


async def test_exclude_filter_drops_matching_messages() -> None:
    store = FakeCaptureStore()
    rules = (CaptureFilter(tag=35, values=("0",), action="exclude"),)
    heartbeat = encode("0", [], sender="A", target="B", seq=9, sending_time="20260101-00:00:00")
    async with service(store, filters=rules) as svc:
        await svc.submit(PEER, 1, [heartbeat, order(1)])
        await svc.flush()
        stats = svc.stats()

    assert [m.msg_type for m in store.messages] == ["D"]
    assert stats["filtered"] == 1


async def test_full_batch_is_written_without_waiting_for_the_timer() -> None:
    store = FakeCaptureStore()
    async with service(store, batch_max=3) as svc:
        await svc.submit(PEER, 1, [order(i) for i in range(3)])
        await asyncio.wait_for(store.written.wait(), 0.5)  # the timer is 10 s away
        assert store.writes == [3]


async def test_partial_batch_is_written_by_the_timer() -> None:
    store = FakeCaptureStore()
    async with service(store, flush_interval_ms=20) as svc:
        await svc.submit(PEER, 1, [order(1)])
        await asyncio.wait_for(store.written.wait(), 1.0)
    assert store.writes == [1]


async def test_store_outage_is_retried_until_stored() -> None:
    store = FakeCaptureStore()
    store.fail_next = 2
    async with service(store) as svc:
        await svc.submit(PEER, 1, [order(1), order(2)])
        await asyncio.wait_for(svc.flush(), 2.0)
        stats = svc.stats()
    assert len(store.messages) == 2
    assert stats["store_errors"] == 2


async def test_slow_store_blocks_submit_instead_of_buffering() -> None:
    store = FakeCaptureStore()
    store.gate = asyncio.Event()
    svc = CaptureService(
        store, CaptureSettings(batch_max=1, flush_interval_ms=10_000), FixCaptureDecoder(),
        queue_batches=2,
    )  # fmt: skip
    await svc.start()
    blocked = asyncio.create_task(_submit_many(svc, 10))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # writer holds 1, queue holds 2: the 4th submit waits
    assert svc.stats()["queued_batches"] == 2
    store.gate.set()
    await asyncio.wait_for(blocked, 1.0)
    await svc.aclose()
    assert len(store.messages) == 10


async def test_full_queue_stops_every_connection_before_it_decodes_more() -> None:
    store = FakeCaptureStore()
    store.gate = asyncio.Event()
    svc = CaptureService(
        store, CaptureSettings(batch_max=2, flush_interval_ms=10_000), FixCaptureDecoder(),
        queue_batches=1,
    )  # fmt: skip
    await svc.start()
    await svc.submit(PEER, 1, [order(1), order(2)])  # the writer takes it, waits on the gate
    await asyncio.sleep(0.01)
    await svc.submit(PEER, 1, [order(3), order(4)])  # queued: the queue is now full
    others = [asyncio.create_task(svc.submit(f"peer{i}", 1, [order(9)])) for i in range(5)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in others)
    assert svc.stats()["accepted"] == 4  # nobody decoded a message while the queue was full
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(*others), 1.0)
    await svc.aclose()
    assert len(store.messages) == 9


async def test_aclose_is_idempotent_and_flushes() -> None:
    store = FakeCaptureStore()
    svc = service(store)
    await svc.start()
    await svc.submit(PEER, 1, [order(1)])
    await svc.aclose()
    await svc.aclose()
    assert len(store.messages) == 1


async def _submit_many(svc: CaptureService, n: int) -> None:
    for i in range(n):
        await svc.submit(PEER, 1, [order(i)])


TRICKY = [
    order(),
    order().replace(b"AAPL", b'A"B'),  # JSON must escape '"'
    order().replace(b"AAPL", b"A\tB\nC\rD"),  # COPY text must escape these
    order().replace(b"AAPL", b"A\x7fB\x02"),  # DEL (plain) and a control character (not)
    order().replace(b"\x0155=AAPL", b"\x01269=0\x01270=1\x01269=1\x01270=2\x0155=AAPL"),
    order().replace(b"AAPL", b"A=B"),  # "=" inside a value
    order().replace(b"AAPL", "Société".encode()),  # non-ASCII
    order().replace(b"AAPL", b"A\x00B"),  # NUL
    order().replace(b"AAPL", b"A\\B"),  # backslash
    order().replace(b"\x0154=1", b"\x0154="),  # empty value
    order().replace(b"\x0154=1", b"\x0154"),  # field without "="
    order().replace(b"\x0154=1", b"\x01054=1"),  # zero-padded tag
    order().replace(b"\x0155=AAPL", b"\x0155=A=B\x0154"),  # counts balance, fields do not
    order().replace(b"\x0149=CLIENT", b""),
]


@pytest.mark.parametrize("frame", TRICKY)
def test_fast_path_and_reference_path_agree(frame: bytes) -> None:
    decoder = FixCaptureDecoder()
    try:
        expected: CapturedMessage | str = _reference(frame, 1, PEER)
    except InvalidMessage as exc:
        expected = exc.reason
    for _ in range(2):  # first call fills the shape cache, second one uses it
        try:
            got: CapturedMessage | str = decoder.decode(frame, 1, PEER)
        except InvalidMessage as exc:
            got = exc.reason
        if isinstance(expected, CapturedMessage):
            assert isinstance(got, CapturedMessage)
            assert (got.fields_json, list(got.tags), list(got.values)) == (
                expected.fields_json, list(expected.tags), list(expected.values),
            )  # fmt: skip
            assert (got.begin_string, got.msg_type, got.sender, got.target) == (
                expected.begin_string, expected.msg_type, expected.sender, expected.target,
            )  # fmt: skip
            assert (got.seq_num, got.symbol) == (expected.seq_num, expected.symbol)
            assert orjson.loads(got.fields_json) == [
                [str(t), v] for t, v in zip(expected.tags, expected.values, strict=True)
            ]
        else:
            assert got == expected


@given(st.binary(max_size=300))
def test_raw_text_round_trips_any_bytes(raw: bytes) -> None:
    text = raw_to_text(raw)
    assert "\x00" not in text
    text.encode("utf-8")  # valid for PostgreSQL text
    assert raw_from_text(text) == raw


def _old_stored_rows(frame: bytes) -> list[list[object]]:
    """What the store used to keep per message: [tag, name, value, meaning] rows."""
    msg = _reference(frame, 1, PEER)
    return [
        [tag, TAG_NAMES.get(tag), value, TAG_ENUMS.get(tag, {}).get(value)]
        for tag, value in zip(msg.tags, msg.values, strict=True)
    ]


def _old_expand(rows: list[list[object]]) -> list[dict[str, object]]:
    """How the API used to turn those rows into its "enriched" objects."""
    out: list[dict[str, object]] = []
    for tag, name, value, meaning_ in rows:
        item = {"tag": tag, "name": name, "value": value}
        if meaning_ is not None:
            item["meaning"] = meaning_
        out.append(item)
    return out


@pytest.mark.parametrize("frame", [f for f in TRICKY if f is not TRICKY[-1]])
def test_read_time_enrichment_equals_what_was_stored_before(frame: bytes) -> None:
    try:
        got = FixCaptureDecoder().decode(frame, 1, PEER)
    except InvalidMessage:
        return  # rejected both ways (test_fast_path_and_reference_path_agree)
    old = _old_stored_rows(frame)
    pairs = stored_fields(orjson.loads(got.fields_json))
    assert enrich(pairs) == _old_expand(old)
    assert [[tag, value] for tag, value in pairs] == [[row[0], row[2]] for row in old]
    # Rows stored in the old layout still read back as the same pairs.
    assert stored_fields(orjson.loads(orjson.dumps(old))) == pairs


def test_plain_flag_only_on_messages_that_need_no_escaping() -> None:
    decoder = FixCaptureDecoder()
    assert decoder.decode(order(), 1, PEER).plain
    for odd in (b'A"B', b"A\\B", b"A\tB", "é".encode()):
        frame = order().replace(b"AAPL", odd)
        assert not decoder.decode(frame, 1, PEER).plain
