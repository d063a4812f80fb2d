"""The capture use case through a fake store: validation, filters, enrichment, batching."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketflow.adapters.capture import decoder as capture_decoder
from marketflow.adapters.capture.decoder import FixCaptureDecoder, _reference
from marketflow.adapters.fix.codec import encode
from marketflow.adapters.fix.dictionary import FixDictionary, enrich, meaning
from marketflow.app.capture import CaptureService
from marketflow.backoff import Backoff
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
        self.entered = asyncio.Event()  # a write has started (and may be held at the gate)

    async def write(
        self, messages: Sequence[CapturedMessage], rejects: Sequence[CaptureReject]
    ) -> list[CaptureReject]:
        self.entered.set()
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


async def settle(rounds: int = 50) -> None:
    """Let every ready task run until it blocks (loop turns, not wall time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


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
        FixDictionary(),
        retry=Backoff(0.01, 5.0, random.Random(0)),
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
        await asyncio.wait_for(store.written.wait(), 5.0)  # the timer is 10 s away
        assert store.writes == [3]


async def test_partial_batch_is_written_by_the_timer() -> None:
    store = FakeCaptureStore()
    async with service(store, flush_interval_ms=20) as svc:
        await svc.submit(PEER, 1, [order(1)])
        await asyncio.wait_for(store.written.wait(), 5.0)
    assert store.writes == [1]


async def test_store_outage_is_retried_until_stored() -> None:
    store = FakeCaptureStore()
    store.fail_next = 2
    async with service(store) as svc:
        await svc.submit(PEER, 1, [order(1), order(2)])
        await asyncio.wait_for(svc.flush(), 5.0)
        stats = svc.stats()
    assert len(store.messages) == 2
    assert stats["store_errors"] == 2


async def test_slow_store_blocks_submit_instead_of_buffering() -> None:
    store = FakeCaptureStore()
    store.gate = asyncio.Event()
    svc = CaptureService(
        store, CaptureSettings(batch_max=1, flush_interval_ms=10_000), FixCaptureDecoder(),
        FixDictionary(), queue_batches=2,
    )  # fmt: skip
    await svc.start()
    submitted: list[int] = []
    blocked = asyncio.create_task(_submit_many(svc, 10, submitted))
    await asyncio.wait_for(store.entered.wait(), 5.0)
    await settle()
    assert not blocked.done()
    assert submitted == [0, 1, 2]  # writer holds 1, queue holds 2: the 4th submit waits
    assert svc.stats()["queued_batches"] == 2
    store.gate.set()
    await asyncio.wait_for(blocked, 5.0)
    await svc.aclose()
    assert len(store.messages) == 10


async def test_full_queue_stops_every_connection_before_it_decodes_more() -> None:
    store = FakeCaptureStore()
    store.gate = asyncio.Event()
    svc = CaptureService(
        store, CaptureSettings(batch_max=2, flush_interval_ms=10_000), FixCaptureDecoder(),
        FixDictionary(), queue_batches=1,
    )  # fmt: skip
    await svc.start()
    await svc.submit(PEER, 1, [order(1), order(2)])  # the writer takes it, waits on the gate
    await asyncio.wait_for(store.entered.wait(), 5.0)
    await svc.submit(PEER, 1, [order(3), order(4)])  # queued: the queue is now full
    others = [asyncio.create_task(svc.submit(f"peer{i}", 1, [order(9)])) for i in range(5)]
    await settle()
    assert not any(t.done() for t in others)
    assert svc.stats()["accepted"] == 4  # nobody decoded a message while the queue was full
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(*others), 5.0)
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


async def _submit_many(svc: CaptureService, n: int, done: list[int]) -> None:
    for i in range(n):
        await svc.submit(PEER, 1, [order(i)])
        done.append(i)


# Decoder paths. Frames are written out literally ("|" is SOH); BodyLength and CheckSum are
# placeholders, the framer checks those before the decoder sees a frame. Every expected value
# below is written by hand from the frame text, not computed by the code under test.
HEAD = "8=FIX.4.2|9=120|35=D|49=CLIENT|56=MARKETFLOW|34=1|52=20261126-11:45:30.123|"
BASE = HEAD + "11=ORD1|55=AAPL|54=1|38=100|40=2|44=187.25|10=000|"
BASE_PAIRS = [
    (8, "FIX.4.2"), (9, "120"), (35, "D"), (49, "CLIENT"), (56, "MARKETFLOW"), (34, "1"),
    (52, "20261126-11:45:30.123"), (11, "ORD1"), (55, "AAPL"), (54, "1"), (38, "100"),
    (40, "2"), (44, "187.25"), (10, "000"),
]  # fmt: skip
ORDER_HEADER = ("FIX.4.2", "D", "CLIENT", "MARKETFLOW", 1, "AAPL")


def frame(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text).replace(b"|", b"\x01")


def with_symbol(value: str) -> list[tuple[int, str]]:
    return [(t, value if t == 55 else v) for t, v in BASE_PAIRS]


# (frame text, its (tag, value) pairs, (BeginString, MsgType, Sender, Target, SeqNum, Symbol))
FAST = [
    (BASE, BASE_PAIRS, ORDER_HEADER),
    (
        HEAD + "269=0|270=1|269=1|270=2|55=AAPL|10=000|",
        [
            *BASE_PAIRS[:7],
            (269, "0"),
            (270, "1"),
            (269, "1"),
            (270, "2"),
            (55, "AAPL"),
            (10, "000"),
        ],
        ORDER_HEADER,
    ),
    (
        "8=FIX.4.4|9=60|35=0|49=A|56=B|34=9|52=20260101-00:00:00|10=000|",
        [
            (8, "FIX.4.4"),
            (9, "60"),
            (35, "0"),
            (49, "A"),
            (56, "B"),
            (34, "9"),
            (52, "20260101-00:00:00"),
            (10, "000"),
        ],
        ("FIX.4.4", "0", "A", "B", 9, None),
    ),
    (  # header out of the usual order, a zero-padded MsgSeqNum, the first Symbol counts
        "8=FIX.4.2|9=99|49=C|35=8|34=0042|56=T|52=x|55=MSFT|9999=y|55=AAPL|10=000|",
        [
            (8, "FIX.4.2"),
            (9, "99"),
            (49, "C"),
            (35, "8"),
            (34, "0042"),
            (56, "T"),
            (52, "x"),
            (55, "MSFT"),
            (9999, "y"),
            (55, "AAPL"),
            (10, "000"),
        ],
        ("FIX.4.2", "8", "C", "T", 42, "MSFT"),
    ),
]

# Frames the fast path must hand to the reference path, each with what must come out.
ODD_SYMBOLS = [
    (b'A"B', 'A"B'),  # JSON must escape '"'
    (b"A\tB\nC\rD", "A\tB\nC\rD"),  # COPY text must escape these
    (b"A\x7fB\x02", "A\x7fB\x02"),  # DEL (plain) and a control character (not)
    (b"A=B", "A=B"),  # "=" inside a value
    ("Société".encode(), "Société"),  # non-ASCII
    (b"A\x00B", "A\\x00B"),  # NUL, escaped for PostgreSQL text
    (b"A\\B", "A\\B"),  # backslash
    (b"\xff\xfe", "\ufffd\ufffd"),  # not UTF-8
]
REFERENCE_VALID = [
    (BASE.encode().replace(b"=AAPL|", b"=" + raw + b"|"), with_symbol(text),
     (*ORDER_HEADER[:5], text))
    for raw, text in ODD_SYMBOLS
] + [
    (BASE.replace("|54=1|", "|54=|"), [(t, "" if t == 54 else v) for t, v in BASE_PAIRS],
     ORDER_HEADER),  # an empty value
]  # fmt: skip
REFERENCE_REJECTED = [
    (BASE.replace("|54=1|", "|54|"), "parse_error: malformed field b'54'"),
    (BASE.replace("|54=1|", "|054=1|"), "parse_error: malformed field b'054=1'"),
    (BASE.replace("|55=AAPL|54=1|", "|55=A=B|54|"), "parse_error: malformed field b'54'"),
    (BASE.replace("|49=CLIENT|", "|"), "missing_header_tags: 49"),
    (BASE.replace("|34=1|", "|34=|"), "missing_header_tags: 34"),
    (BASE.replace("|34=1|", "|34=x|").replace("AAPL", 'A"B'), "bad_seq_num: 'x'"),
    (BASE[:-1], "parse_error: message does not end with SOH"),
]


@pytest.fixture
def reference_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Frames the decoder handed to its reference path (the fast path handled the rest)."""
    calls: list[bytes] = []

    def spy(frame: bytes, received_ms: int, peer: str) -> CapturedMessage:
        calls.append(frame)
        return _reference(frame, received_ms, peer)

    monkeypatch.setattr(capture_decoder, "_reference", spy)
    return calls


def header(msg: CapturedMessage) -> tuple[object, ...]:
    return (msg.begin_string, msg.msg_type, msg.sender, msg.target, msg.seq_num, msg.symbol)


def assert_decoded(
    msg: CapturedMessage, pairs: list[tuple[int, str]], head: tuple[object, ...]
) -> None:
    assert list(zip(msg.tags, msg.values, strict=True)) == pairs
    assert orjson.loads(msg.fields_json) == [[str(t), v] for t, v in pairs]
    assert header(msg) == head
    assert (msg.peer, msg.received_ms) == (PEER, 1)


@pytest.mark.parametrize(("text", "pairs", "head"), FAST)
def test_fast_path_decodes_plain_messages(
    text: str,
    pairs: list[tuple[int, str]],
    head: tuple[object, ...],
    reference_calls: list[bytes],
) -> None:
    decoder = FixCaptureDecoder()
    for _ in range(2):  # the first call fills the shape cache, the second one uses it
        msg = decoder.decode(frame(text), 1, PEER)
        assert msg.plain
        assert_decoded(msg, pairs, head)
    assert reference_calls == []  # the fast path did it alone
    assert_decoded(_reference(frame(text), 1, PEER), pairs, head)  # and the two paths agree


def test_fast_path_rejects_a_non_numeric_seq_num_by_itself(reference_calls: list[bytes]) -> None:
    decoder = FixCaptureDecoder()
    for seq in ("x", "-1", "1.5"):
        for _ in range(2):
            with pytest.raises(InvalidMessage) as exc:
                decoder.decode(frame(BASE.replace("|34=1|", f"|34={seq}|")), 1, PEER)
            assert exc.value.reason == f"bad_seq_num: '{seq}'"
    assert reference_calls == []


@pytest.mark.parametrize(("raw", "pairs", "head"), REFERENCE_VALID)
def test_reference_path_decodes_what_the_fast_path_hands_it(
    raw: str | bytes,
    pairs: list[tuple[int, str]],
    head: tuple[object, ...],
    reference_calls: list[bytes],
) -> None:
    decoder = FixCaptureDecoder()
    for calls in (1, 2):
        msg = decoder.decode(frame(raw), 1, PEER)
        assert not msg.plain
        assert_decoded(msg, pairs, head)
        assert reference_calls == [frame(raw)] * calls


@pytest.mark.parametrize(("text", "reason"), REFERENCE_REJECTED)
def test_reference_path_rejects_with_the_reason(
    text: str, reason: str, reference_calls: list[bytes]
) -> None:
    decoder = FixCaptureDecoder()
    for calls in (1, 2):
        with pytest.raises(InvalidMessage) as exc:
            decoder.decode(frame(text), 1, PEER)
        assert exc.value.reason == reason
        assert len(reference_calls) == calls


@given(st.binary(max_size=300))
def test_raw_text_round_trips_any_bytes(raw: bytes) -> None:
    text = raw_to_text(raw)
    assert "\x00" not in text
    text.encode("utf-8")  # valid for PostgreSQL text
    assert raw_from_text(text) == raw


def named(tag: int, name: str | None, value: str, meaning_: str | None = None) -> dict[str, object]:
    item: dict[str, object] = {"tag": tag, "name": name, "value": value}
    if meaning_ is not None:
        item["meaning"] = meaning_
    return item


# Names and meanings as the FIX 4.2/4.4 specification spells them.
ENRICHED_BASE = [
    named(8, "BeginString", "FIX.4.2"), named(9, "BodyLength", "120"),
    named(35, "MsgType", "D", "NewOrderSingle"), named(49, "SenderCompID", "CLIENT"),
    named(56, "TargetCompID", "MARKETFLOW"), named(34, "MsgSeqNum", "1"),
    named(52, "SendingTime", "20261126-11:45:30.123"), named(11, "ClOrdID", "ORD1"),
    named(55, "Symbol", "AAPL"), named(54, "Side", "1", "Buy"), named(38, "OrderQty", "100"),
    named(40, "OrdType", "2", "Limit"), named(44, "Price", "187.25"),
    named(10, "CheckSum", "000"),
]  # fmt: skip
ENRICHED = [
    (BASE, ENRICHED_BASE),
    (BASE.replace("AAPL", 'A"B'), [*ENRICHED_BASE[:8], named(55, "Symbol", 'A"B'),
                                   *ENRICHED_BASE[9:]]),
    (BASE.replace("|54=1|", "|54=|"), [*ENRICHED_BASE[:9], named(54, "Side", ""),
                                       *ENRICHED_BASE[10:]]),  # no meaning for ""
    (BASE.replace("|54=1|38=100|40=2|", "|54=2|38=100|40=1|"), [*ENRICHED_BASE[:9],
     named(54, "Side", "2", "Sell"), ENRICHED_BASE[10], named(40, "OrdType", "1", "Market"),
     *ENRICHED_BASE[12:]]),
    (BASE.replace("|54=1|", "|54=Z|9999=q|"), [*ENRICHED_BASE[:9], named(54, "Side", "Z"),
     named(9999, None, "q"), *ENRICHED_BASE[10:]]),  # not an enum value; an unknown tag
    (
        "8=FIX.4.4|9=90|35=W|49=A|56=B|34=2|52=x|262=r1|268=2|269=0|270=10.5|269=1|270=11|10=1|",
        [named(8, "BeginString", "FIX.4.4"), named(9, "BodyLength", "90"),
         named(35, "MsgType", "W", "MarketDataSnapshotFullRefresh"),
         named(49, "SenderCompID", "A"), named(56, "TargetCompID", "B"),
         named(34, "MsgSeqNum", "2"), named(52, "SendingTime", "x"),
         named(262, "MDReqID", "r1"), named(268, "NoMDEntries", "2"),
         named(269, "MDEntryType", "0", "Bid"), named(270, "MDEntryPx", "10.5"),
         named(269, "MDEntryType", "1", "Offer"), named(270, "MDEntryPx", "11"),
         named(10, "CheckSum", "1")],
    ),
    (
        "8=FIX.4.2|9=60|35=0|49=A|56=B|34=9|52=x|10=000|",
        [named(8, "BeginString", "FIX.4.2"), named(9, "BodyLength", "60"),
         named(35, "MsgType", "0", "Heartbeat"), named(49, "SenderCompID", "A"),
         named(56, "TargetCompID", "B"), named(34, "MsgSeqNum", "9"),
         named(52, "SendingTime", "x"), named(10, "CheckSum", "000")],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ENRICHED)
def test_read_time_enrichment_names_fields_as_the_fix_specification(
    text: str, expected: list[dict[str, object]]
) -> None:
    got = FixCaptureDecoder().decode(frame(text), 1, PEER)
    pairs = stored_fields(orjson.loads(got.fields_json))
    assert enrich(pairs) == expected


def test_plain_flag_only_on_messages_that_need_no_escaping() -> None:
    decoder = FixCaptureDecoder()
    assert decoder.decode(order(), 1, PEER).plain
    for odd in (b'A"B', b"A\\B", b"A\tB", "é".encode()):
        frame = order().replace(b"AAPL", odd)
        assert not decoder.decode(frame, 1, PEER).plain
