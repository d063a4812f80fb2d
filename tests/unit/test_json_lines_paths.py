"""Which decoding path JsonLinesParser takes (README: a chunk decoded at once must prove one
value per line, else it is decoded line by line), the samples kept with rejects, and exact
bounds. Written for mutation testing of marketflow/adapters/feeds/json_lines.py."""

from __future__ import annotations

from marketflow.adapters.feeds.json_lines import JsonLinesParser
from marketflow.domain.ticks import MAX_TS_MS, MIN_TS_MS, RejectCounts

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
        [("BTCUSDT", 1.5, NOW), ("BTCUSDT", 3.5, NOW), ("ETHUSDT", 2.5, NOW)],
        [("BTCUSDT", 1.5, NOW), ("BTCUSDT", 2.5, NOW)],
        [("BTCUSDT", 1.5, NOW), ("BTCUSDT", 2.5, NOW)],
        [("BTCUSDT", 1.5, NOW)],
    ]
    for chunk, ticks in zip(chunks, want, strict=True):
        p = Spy()
        batch = p.parse(chunk, NOW)
        assert sorted(batch.ticks()) == ticks, chunk
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
        assert batch.ticks() == ([("BTCUSDT", 1.5, NOW)] if b"[" in chunk or b"{n" in chunk
                                 else []), chunk  # fmt: skip
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
    assert sorted(batch.ticks()) == sorted([
        ("BTCUSDT", 100.0, NOW), ("BTCUSDT", 100.0, NOW), ("BTCUSDT", 0.000001, NOW),
        ("BTCUSDT", 1.0, MIN_TS_MS), ("BTCUSDT", 1.0, MIN_TS_MS), ("BTCUSDT", 2.0, NOW + 60_000),
    ])  # fmt: skip
    assert all(type(price) is float for _, price, _ in batch.ticks())
    bad = [tick("1.0", ts=MIN_TS_MS - 1), tick("1", ts=MIN_TS_MS - 1),
           tick("1.0", ts=NOW + 60_001), tick("1", ts=MAX_TS_MS + 1)]  # fmt: skip
    p.parse(b"\n".join(bad), NOW)
    assert p.rejects.counts == {"timestamp_invalid": 3, "timestamp_in_future": 1}
