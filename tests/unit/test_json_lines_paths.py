"""Which decoding path JsonLinesParser takes (README: a chunk decoded at once must prove one
value per line, else it is decoded line by line), the samples kept with rejects, and exact
bounds. Written for mutation testing of marketflow/adapters/feeds/json_lines.py."""

from __future__ import annotations

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.domain.ticks import MAX_TS_MS, MIN_TS_MS, RejectCounts
from tests.unit.folding import expect_seconds

NOW = 1_795_694_355_187


class Spy(JsonLinesParser):
    """Counts the line-by-line fallbacks."""

    def __init__(self, max_price: float = 1e12) -> None:
        super().__init__("ex", frozenset({"BTCUSDT", "ETHUSDT"}), RejectCounts(), 60_000, max_price)
        self.fallbacks = 0

    def _decode_lines(self, data: bytes) -> list[object]:
        self.fallbacks += 1
        return super()._decode_lines(data)


def tick(price: str, ts: int = NOW, symbol: str = "BTCUSDT") -> bytes:
    return b'{"symbol":"%s","price":%s,"timestamp":%d}' % (symbol.encode(), price.encode(), ts)


def test_clean_chunks_are_decoded_at_once() -> None:
    chunks = [
        tick("1.5") + b"\n",
        tick("1.5"),  # no final newline
        tick("1.5") + b"\n" + tick("2.5", symbol="ETHUSDT") + b"\n" + tick("3.5") + b"\n",
        tick("1.5") + b"\r\n" + tick("2.5") + b"\r\n",
        tick("1.5") + b"\n\n\n" + tick("2.5") + b"\n\n",  # blank lines
        b"\n" + tick("1.5") + b"\n",
    ]
    want = [
        [("BTCUSDT", 1.5, NOW)],
        [("BTCUSDT", 1.5, NOW)],
        [("BTCUSDT", 1.5, NOW), ("ETHUSDT", 2.5, NOW), ("BTCUSDT", 3.5, NOW)],
        [("BTCUSDT", 1.5, NOW), ("BTCUSDT", 2.5, NOW)],
        [("BTCUSDT", 1.5, NOW), ("BTCUSDT", 2.5, NOW)],
        [("BTCUSDT", 1.5, NOW)],
    ]
    for chunk, ticks in zip(chunks, want, strict=True):
        p = Spy()
        batch = p.parse(chunk, NOW)
        assert batch.seconds() == expect_seconds(ticks), chunk
        assert batch.count == len(ticks)
        assert p.fallbacks == 0, chunk
        assert p.rejects.counts == {}


def test_chunks_that_cannot_prove_one_value_per_line_are_decoded_line_by_line() -> None:
    for chunk in (
        tick("1.5") + b"\n[1, 2]\n",  # brackets: never joined
        tick("1.5") + tick("2.5") + b"\n",  # two values glued on one line
        tick("1.5") + b"\n{not json}\n",
    ):
        p = Spy()
        batch = p.parse(chunk, NOW)
        assert p.fallbacks == 1, chunk
        kept = [("BTCUSDT", 1.5, NOW)] if b"[" in chunk or b"{n" in chunk else []
        assert batch.seconds() == expect_seconds(kept), chunk
        assert p.rejects.total() == 1, (chunk, p.rejects.counts)


def test_empty_chunk_keeps_the_exchange_and_receipt_time() -> None:
    for chunk in (b"", b"\n", b"\n\n\r\n"):
        batch = Spy().parse(chunk, NOW)
        assert (batch.exchange, batch.by_symbol, batch.received_ms, batch.count) == (
            "ex", {}, NOW, 0,
        )  # fmt: skip


def test_a_reject_keeps_the_offending_object_as_its_sample() -> None:
    p = Spy()
    p.parse(tick("-1.0") + b"\n" + tick("2.0", symbol="XRPUSDT") + b"\n", NOW)
    assert p.rejects.samples == {
        "price_not_positive": tick("-1.0"),
        "unknown_symbol": tick("2.0", symbol="XRPUSDT"),
    }


def test_line_orjson_refuses_is_judged_against_the_configured_maximum() -> None:
    # orjson refuses a lone surrogate escape that Python's json accepts.
    lone = b'{"symbol":"\\ud800","price":500.0,"timestamp":%d}' % NOW
    p = Spy(max_price=100.0)
    p.parse(lone + b"\n", NOW)
    assert p.rejects.counts == {"price_out_of_range": 1}
    q = Spy()
    q.parse(lone + b"\n", NOW)
    assert q.rejects.counts == {"bad_json": 1}


def test_bounds_are_inclusive() -> None:
    p = Spy(max_price=100.0)
    ok = [tick("100.0"), tick("100"), tick("0.000001"), tick("1.0", ts=MIN_TS_MS),
          tick("1", ts=MIN_TS_MS), tick("2.0", ts=NOW + 60_000)]  # fmt: skip
    batch = p.parse(b"\n".join(ok), NOW)
    assert batch.count == 6, p.rejects.counts
    assert batch.seconds() == expect_seconds([
        ("BTCUSDT", 100.0, NOW), ("BTCUSDT", 100.0, NOW), ("BTCUSDT", 0.000001, NOW),
        ("BTCUSDT", 1.0, MIN_TS_MS), ("BTCUSDT", 1.0, MIN_TS_MS), ("BTCUSDT", 2.0, NOW + 60_000),
    ])  # fmt: skip
    assert all(type(f[0]) is float and type(f[5]) is float for f in batch.seconds().values())
    bad = [tick("1.0", ts=MIN_TS_MS - 1), tick("1", ts=MIN_TS_MS - 1),
           tick("1.0", ts=NOW + 60_001), tick("1", ts=MAX_TS_MS + 1)]  # fmt: skip
    p.parse(b"\n".join(bad), NOW)
    assert p.rejects.counts == {"timestamp_invalid": 3, "timestamp_in_future": 1}


def test_reference_format_chunks_take_the_typed_fold_and_others_the_orjson_path() -> None:
    typed = Spy().parse(tick("1.5") + b"\n" + tick("2", symbol="ETHUSDT") + b"\n", NOW)
    assert typed.by_symbol == {}  # folded while decoding: no per-tick points at all
    assert typed.folded == expect_seconds([("BTCUSDT", 1.5, NOW), ("ETHUSDT", 2.0, NOW)])
    # An extra field, or a broken rule, is validated tick by tick: same ticks, same answer.
    extra = tick("1.5").replace(b"}", b',"qty":3}') + b"\n" + tick("2", symbol="ETHUSDT")
    p = Spy()
    checked = p.parse(extra + b"\n", NOW)
    assert checked.folded == {}
    assert checked.by_symbol == {"BTCUSDT": [(1.5, NOW)], "ETHUSDT": [(2.0, NOW)]}
    assert checked.seconds() == typed.seconds()
    assert p.fallbacks == 0  # the chunk was still decoded at once (by orjson)


def test_a_rule_broken_in_the_typed_fold_costs_only_its_line() -> None:
    p = Spy()
    batch = p.parse(tick("1.5") + b"\n" + tick("true") + b"\n" + tick("2.5") + b"\n", NOW)
    assert batch.seconds() == expect_seconds([("BTCUSDT", 1.5, NOW), ("BTCUSDT", 2.5, NOW)])
    assert p.rejects.counts == {"price_not_number": 1}


def test_typed_fold_rejects_unknown_symbols_and_future_ticks_once_each() -> None:
    p = Spy()
    chunk = b"\n".join([
        tick("1.5", symbol="XRPUSDT"), tick("1.5"), tick("2.5", ts=NOW + 60_001),
        tick("3.5", ts=NOW + 60_000), tick("4.5", ts=NOW + 60_002), b"",
    ])  # fmt: skip
    batch = p.parse(chunk, NOW)
    assert batch.by_symbol == {}
    assert batch.seconds() == expect_seconds(
        [("BTCUSDT", 1.5, NOW), ("BTCUSDT", 3.5, NOW + 60_000)]
    )
    assert p.rejects.counts == {"unknown_symbol": 1, "timestamp_in_future": 2}
    assert p.rejects.samples["unknown_symbol"] == tick("1.5", symbol="XRPUSDT")


def test_a_bare_number_line_leaves_the_typed_fold_without_counting_its_rejects_twice() -> None:
    p = Spy()
    chunk = tick("1.5", symbol="XRPUSDT") + b"\n0\n" + tick("2.5") + b"\n"
    batch = p.parse(chunk, NOW)
    assert batch.seconds() == expect_seconds([("BTCUSDT", 2.5, NOW)])
    assert p.rejects.counts == {"unknown_symbol": 1, "not_an_object": 1}
