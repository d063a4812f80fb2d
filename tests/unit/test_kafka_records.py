"""Tick records on the Kafka ticks topic: a batch survives the trip exactly, and a record that
is not one is refused with a reason (what the consumer counts and dead-letters)."""

from __future__ import annotations

import msgspec
import pytest

from marketflow.adapters.kafka.records import (
    SCHEMA_VERSION,
    RecordError,
    TickRecord,
    decode_record,
    encode_batch,
)
from marketflow.domain.ticks import BookUpdate, TickBatch

TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _batch() -> TickBatch:
    return TickBatch(
        "ex1",
        {"BTCUSDT": [(100.0, TS), (101.5, TS + 1)], "ETHUSDT": [(5.0, TS + 2)]},
        TS + 10,
        6,
        {("SOLUSDT", TS // 1000): [1.0, 3.0, 6.0, 3.0, float(TS + 999), 2.0]},
        [
            BookUpdate(
                "ex1", "BTCUSDT", 99.5, 100.5, TS, 2.0, None, ((99.5, 2.0),), ((100.5, None),)
            )
        ],
    )


def test_a_batch_becomes_one_record_per_symbol_keyed_by_it() -> None:
    records = encode_batch(_batch())
    assert [k for k, _ in records] == [b"BTCUSDT", b"ETHUSDT", b"SOLUSDT"]
    back = [decode_record(v) for _, v in records]
    assert back[0].by_symbol == {"BTCUSDT": [(100.0, TS), (101.5, TS + 1)]}
    assert back[0].books == _batch().books
    assert (back[0].count, back[0].received_ms, back[0].exchange) == (2, TS + 10, "ex1")
    assert back[1].count == 1
    assert back[2].folded == {("SOLUSDT", TS // 1000): [1.0, 3.0, 6.0, 3.0, float(TS + 999), 2.0]}
    assert (back[2].count, back[2].by_symbol) == (3, {})
    assert sum(b.count for b in back) == _batch().count


def _raw(**change: object) -> bytes:
    fields = {
        "version": SCHEMA_VERSION,
        "exchange": "ex1",
        "symbol": "BTCUSDT",
        "received_ms": TS,
        "count": 1,
        "points": [(100.0, TS)],
        "seconds": [],
        "books": [],
    }
    fields.update(change)
    return msgspec.msgpack.encode(list(fields.values()))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "record_empty"),
        (b"\xc1garbage", "record_undecodable"),
        (b'{"symbol":"BTCUSDT"}', "record_undecodable"),
        (_raw(version=2), "record_unknown_version"),
        (_raw(points=[(True, TS)]), "record_undecodable"),
        (_raw(points=[("100", TS)]), "record_undecodable"),
        (_raw(points=[(float("nan"), TS)]), "price_not_finite"),
        (_raw(points=[(-1.0, TS)]), "price_not_positive"),
        (_raw(points=[(1e300, TS)]), "price_out_of_range"),
        (_raw(points=[(1.0, TS // 1000)]), "timestamp_out_of_range"),
        (_raw(count=2), "record_count_mismatch"),
        (_raw(symbol=""), "record_unnamed"),
        (
            _raw(count=2, points=[], seconds=[(TS // 1000, 1.0, 2.0, 9.0, 2, TS, 1.5)]),
            "record_inconsistent_second",
        ),
        (
            _raw(count=1, points=[], seconds=[(TS // 1000 + 1, 1.0, 1.0, 1.0, 1, TS, 1.0)]),
            "record_inconsistent_second",
        ),
        (_raw(points=[(1.0, TS, 3)]), "record_undecodable"),
    ],
)
def test_a_record_that_is_not_one_is_refused_with_its_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(raw)
    assert info.value.reason == reason


def test_unknown_symbols_are_refused_when_the_pairs_are_given() -> None:
    _, value = encode_batch(_batch())[1]
    assert decode_record(value, symbols=frozenset({"ETHUSDT"})).count == 1
    with pytest.raises(RecordError, match="unknown_symbol"):
        decode_record(value, symbols=frozenset({"BTCUSDT"}))


def test_the_record_layout_is_positional_and_versioned_first() -> None:
    _, value = encode_batch(_batch())[1]
    assert msgspec.msgpack.decode(value)[0] == SCHEMA_VERSION
    assert msgspec.msgpack.decode(value, type=TickRecord).symbol == "ETHUSDT"
